"""The simulated hypervisor across processes: shared pages, notifications, crashes, startup."""

from __future__ import annotations

import errno
import multiprocessing
import os
import select
import socket
from multiprocessing.connection import Connection
from pathlib import Path

import pytest
import trio

from displback.sim.hvwire import recv_message, send_message
from displback.sim.hypervisor import HypervisorProcess, HypervisorThread, query_counters
from displback.sim.platform import SimDomain, SimPlatform

from .conftest import wait_for_no_leaks

GUEST = 1


def _guest_process(path: str, pipe: Connection) -> None:
    """A guest in another process: grant a page, offer a port, answer two messages."""
    with SimDomain(path, GUEST) as dom:
        [pfn] = dom.alloc_pages(1)
        gref = dom.grant(pfn, 0)
        evtchn = dom.open_event_channels()
        port = evtchn.bind_unbound_port(0)
        pipe.send((gref, port))
        with dom.map_pages([pfn]) as page:
            for expected, reply in ((b"ping", b"pong"), (b"done", b"bye!")):
                # Wait for the backend's notification, like an interrupt handler would.
                assert select.select([evtchn.fileno()], [], [], 10)[0]
                assert evtchn.read_pending() == [port]
                assert bytes(page.buffer[:4]) == expected
                evtchn.unmask([port])
                page.buffer[:4] = reply
                evtchn.notify(port)
        pipe.recv()  # the backend has unmapped
        dom.end_access(gref)
        dom.free_pages([pfn])
        evtchn.close()


async def test_two_processes_share_a_granted_page_and_notify_each_other(
    hypervisor: HypervisorThread,
) -> None:
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    child = ctx.Process(target=_guest_process, args=(hypervisor.socket_path, theirs))
    child.start()
    try:
        gref, fe_port = await trio.to_thread.run_sync(ours.recv)
        with SimPlatform(hypervisor.socket_path, "unused") as platform:
            gntdev = platform.open_grant_device()
            evtchn = platform.open_event_channels()
            port = evtchn.bind_interdomain(GUEST, fe_port)
            evtchn.unmask(evtchn.read_pending())  # Xen's bind-time event
            with gntdev.map_grants(GUEST, [gref]) as mapping:
                for message, answer in ((b"ping", b"pong"), (b"done", b"bye!")):
                    mapping.buffer[:4] = message
                    evtchn.notify(port)
                    with trio.fail_after(10):
                        await trio.lowlevel.wait_readable(evtchn.fileno())
                    assert evtchn.read_pending() == [port]
                    assert bytes(mapping.buffer[:4]) == answer
                    evtchn.unmask([port])
            ours.send("unmapped")
            await trio.to_thread.run_sync(child.join, 10)
            assert child.exitcode == 0
            evtchn.close()
            gntdev.close()
    finally:
        if child.is_alive():
            child.kill()
        child.join()


def _crashing_backend(path: str, gref: int, fe_port: int, pipe: Connection) -> None:
    """A backend that maps, binds and exports, then dies without cleaning up."""
    platform = SimPlatform(path, "unused")
    gntdev = platform.open_grant_device()
    evtchn = platform.open_event_channels()
    evtchn.bind_interdomain(GUEST, fe_port)
    mapping = gntdev.map_grants(GUEST, [gref])
    mapping.buffer[0] = 0x42
    gntdev.dmabuf_export(GUEST, [gref])
    pipe.send(platform.alloc_dmabuf(4096))
    pipe.recv()
    os._exit(0)


def test_a_dying_client_releases_its_mappings_ports_and_dmabufs(
    hypervisor: HypervisorThread,
) -> None:
    with SimDomain(hypervisor.socket_path, GUEST) as guest:
        [pfn] = guest.alloc_pages(1)
        gref = guest.grant(pfn, 0)
        evtchn = guest.open_event_channels()
        fe_port = evtchn.bind_unbound_port(0)
        ctx = multiprocessing.get_context("spawn")
        ours, theirs = ctx.Pipe()
        child = ctx.Process(
            target=_crashing_backend, args=(hypervisor.socket_path, gref, fe_port, theirs)
        )
        child.start()
        ours.recv()
        dom0 = hypervisor.counters()["domains"][0]
        assert dom0["mappings"] == 2 and dom0["ports"] == 1 and dom0["dmabufs"] == 2
        with pytest.raises(OSError):
            guest.end_access(gref)
        ours.send("die")
        child.join(10)
        assert child.exitcode == 0
        survivors = {"connections": 2, f"dom{GUEST}": {"pages": 1, "grants": 1, "ports": 1}}
        assert wait_for_no_leaks(hypervisor, expected=survivors) == survivors
        with guest.map_pages([pfn]) as page:
            assert page.buffer[0] == 0x42
        guest.end_access(gref)  # no longer mapped
        guest.free_pages([pfn])
        evtchn.close()


def test_abandoned_devices_are_released_like_a_crash(hypervisor: HypervisorThread) -> None:
    with SimDomain(hypervisor.socket_path, GUEST) as guest:
        [pfn] = guest.alloc_pages(1)
        gref = guest.grant(pfn, 0)
        with SimPlatform(hypervisor.socket_path, "unused") as platform:
            evtchn = platform.open_event_channels()
            fe = guest.open_event_channels()
            evtchn.bind_interdomain(GUEST, fe.bind_unbound_port(0))
            gntdev = platform.open_grant_device()
            mapping = gntdev.map_grants(GUEST, [gref])
            evtchn.abandon()
            gntdev.abandon()
            survivors = {
                "connections": 3,
                f"dom{GUEST}": {"pages": 1, "grants": 1, "ports": 1},
            }
            assert wait_for_no_leaks(hypervisor, expected=survivors) == survivors
            mapping.close()  # the process-side unmap still works
            fe.close()
        guest.end_access(gref)
        guest.free_pages([pfn])


def test_guest_that_vanishes_leaves_nothing_behind(hypervisor: HypervisorThread) -> None:
    guest = SimDomain(hypervisor.socket_path, GUEST)
    pfns = guest.alloc_pages(4)
    for pfn in pfns:
        guest.grant(pfn, 0)
    guest.abandon()
    assert wait_for_no_leaks(hypervisor) == {}


def test_request_before_hello_is_refused_and_garbage_drops_only_that_client(
    hypervisor: HypervisorThread,
) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(hypervisor.socket_path)
        send_message(sock, {"op": "alloc_pages", "count": 1})
        reply, fds = recv_message(sock)
        assert reply["errno"] == errno.EPROTO and fds == []
        send_message(sock, {"op": "hello", "domid": 2})
        recv_message(sock)
        send_message(sock, {"op": "no_such_op"})
        assert recv_message(sock)[0]["errno"] == errno.ENOSYS
        send_message(sock, {"op": "alloc_pages", "count": "many"})
        assert recv_message(sock)[0]["errno"] == errno.EINVAL
        sock.sendall(b"\x05\x00\x00\x00[1,2]")
        assert sock.recv(1) == b""  # not an object: connection dropped
    with SimDomain(hypervisor.socket_path, 2) as dom:
        assert len(dom.alloc_pages(1)) == 1


def test_standalone_hypervisor_serves_and_removes_its_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "hv.sock")
    with HypervisorProcess(path) as hv:
        with SimDomain(path, 9) as dom:
            dom.alloc_pages(2)
            assert query_counters(path)["domains"]["9"]["pages"] == 2
        assert wait_for_no_leaks(hv) == {}
    assert not os.path.exists(path)
