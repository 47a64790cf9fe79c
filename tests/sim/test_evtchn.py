"""Simulated event channels behave like /dev/xen/evtchn: masking, pending, errors, unbinding."""

from __future__ import annotations

import errno
import select
from collections.abc import Iterator

import pytest
import trio
import trio.testing

from displback.sim.hypervisor import EVTCHN_MAX_PORTS, HypervisorThread
from displback.sim.platform import SimDomain, SimEventChannels, SimPlatform
from displback.xen.interfaces import EventChannels

GUEST = 5


@pytest.fixture
def backend(hypervisor: HypervisorThread) -> Iterator[SimEventChannels]:
    with SimPlatform(hypervisor.socket_path, "unused") as platform:
        evtchn = platform.open_event_channels()
        yield evtchn
        evtchn.close()


@pytest.fixture
def frontend(hypervisor: HypervisorThread) -> Iterator[SimEventChannels]:
    with SimDomain(hypervisor.socket_path, GUEST) as dom:
        evtchn = dom.open_event_channels()
        yield evtchn
        evtchn.close()


def connect(backend: SimEventChannels, frontend: SimEventChannels) -> tuple[int, int]:
    """Bind a channel like displif does; drain the bind-time pending event. (be, fe) ports."""
    fe_port = frontend.bind_unbound_port(0)
    be_port = backend.bind_interdomain(GUEST, fe_port)
    assert backend.read_pending() == [be_port]
    backend.unmask([be_port])
    return be_port, fe_port


def readable(evtchn: SimEventChannels) -> bool:
    return bool(select.select([evtchn.fileno()], [], [], 0)[0])


def test_sim_event_channels_satisfy_the_protocol(backend: SimEventChannels) -> None:
    assert isinstance(backend, EventChannels)


def test_bind_interdomain_returns_a_local_port_that_starts_pending_once(
    backend: SimEventChannels, frontend: SimEventChannels
) -> None:
    fe_port = frontend.bind_unbound_port(0)
    be_port = backend.bind_interdomain(GUEST, fe_port)
    assert be_port >= 1
    assert readable(backend)
    assert backend.read_pending() == [be_port]
    assert backend.read_pending() == []
    assert frontend.read_pending() == []


def test_notify_reaches_the_peer_in_both_directions(
    backend: SimEventChannels, frontend: SimEventChannels
) -> None:
    be_port, fe_port = connect(backend, frontend)
    assert not readable(backend) and not readable(frontend)
    frontend.notify(fe_port)
    assert readable(backend)
    assert backend.read_pending() == [be_port]
    backend.notify(be_port)
    assert frontend.read_pending() == [fe_port]


def test_fired_port_stays_masked_until_unmasked(
    backend: SimEventChannels, frontend: SimEventChannels
) -> None:
    be_port, fe_port = connect(backend, frontend)
    frontend.notify(fe_port)
    assert backend.read_pending() == [be_port]
    frontend.notify(fe_port)
    assert not readable(backend)
    assert backend.read_pending() == []


def test_notification_while_masked_is_delivered_once_after_unmask(
    backend: SimEventChannels, frontend: SimEventChannels
) -> None:
    be_port, fe_port = connect(backend, frontend)
    frontend.notify(fe_port)
    assert backend.read_pending() == [be_port]
    frontend.notify(fe_port)
    frontend.notify(fe_port)
    backend.unmask([be_port])
    assert readable(backend)
    assert backend.read_pending() == [be_port]
    backend.unmask([be_port])
    assert backend.read_pending() == []


def test_unmask_without_new_notification_reports_nothing(
    backend: SimEventChannels, frontend: SimEventChannels
) -> None:
    be_port, fe_port = connect(backend, frontend)
    frontend.notify(fe_port)
    assert backend.read_pending() == [be_port]
    backend.unmask([be_port, 9999])  # unknown ports are ignored like the device does
    assert backend.read_pending() == []


def test_reset_drops_pending_and_leaves_those_ports_masked(
    backend: SimEventChannels, frontend: SimEventChannels
) -> None:
    be_port, fe_port = connect(backend, frontend)
    frontend.notify(fe_port)
    backend.reset()
    assert backend.read_pending() == []
    frontend.notify(fe_port)
    assert backend.read_pending() == []
    backend.unmask([be_port])
    assert backend.read_pending() == [be_port]


def test_ports_of_several_channels_are_reported_separately(
    backend: SimEventChannels, frontend: SimEventChannels
) -> None:
    be_a, fe_a = connect(backend, frontend)
    be_b, fe_b = connect(backend, frontend)
    assert be_a != be_b and fe_a != fe_b
    frontend.notify(fe_b)
    assert backend.read_pending() == [be_b]
    frontend.notify(fe_a)
    assert sorted(backend.read_pending()) == [be_a]


def test_notify_on_a_port_not_bound_here_is_enotconn(
    backend: SimEventChannels, frontend: SimEventChannels
) -> None:
    fe_port = frontend.bind_unbound_port(0)
    for call in (backend.notify, backend.unbind):
        with pytest.raises(OSError) as exc:
            call(fe_port + 100)
        assert exc.value.errno == errno.ENOTCONN
    with pytest.raises(OSError) as out_of_range:
        backend.notify(EVTCHN_MAX_PORTS)
    assert out_of_range.value.errno == errno.EINVAL


def test_notify_on_unbound_port_is_silently_dropped(
    backend: SimEventChannels, frontend: SimEventChannels
) -> None:
    fe_port = frontend.bind_unbound_port(0)
    frontend.notify(fe_port)
    assert frontend.read_pending() == []


def test_bind_to_a_port_not_offered_to_us_is_einval(
    hypervisor: HypervisorThread, backend: SimEventChannels, frontend: SimEventChannels
) -> None:
    other = frontend.bind_unbound_port(7)
    with pytest.raises(OSError) as exc:
        backend.bind_interdomain(GUEST, other)
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(OSError) as missing:
        backend.bind_interdomain(GUEST, 4000)
    assert missing.value.errno == errno.EINVAL
    with pytest.raises(OSError) as no_domain:
        backend.bind_interdomain(4321, 1)
    assert no_domain.value.errno == errno.ESRCH
    fe_port = frontend.bind_unbound_port(0)
    backend.bind_interdomain(GUEST, fe_port)
    with pytest.raises(OSError) as twice:  # already bound
        backend.bind_interdomain(GUEST, fe_port)
    assert twice.value.errno == errno.EINVAL


def test_unbind_makes_the_peer_unbound_and_rebindable(
    hypervisor: HypervisorThread, backend: SimEventChannels, frontend: SimEventChannels
) -> None:
    be_port, fe_port = connect(backend, frontend)
    backend.unbind(be_port)
    assert hypervisor.counters()["domains"][0]["ports"] == 0
    with pytest.raises(OSError) as exc:
        backend.notify(be_port)
    assert exc.value.errno == errno.ENOTCONN
    frontend.notify(fe_port)  # goes nowhere
    again = backend.bind_interdomain(GUEST, fe_port)
    assert backend.read_pending() == [again]  # only Xen's bind-time event
    backend.unmask([again])
    frontend.notify(fe_port)
    assert backend.read_pending() == [again]


def test_closing_the_device_unbinds_its_ports(
    hypervisor: HypervisorThread, backend: SimEventChannels, frontend: SimEventChannels
) -> None:
    with SimPlatform(hypervisor.socket_path, "unused") as platform:
        evtchn = platform.open_event_channels()
        fe_port = frontend.bind_unbound_port(0)
        evtchn.bind_interdomain(GUEST, fe_port)
        assert hypervisor.counters()["domains"][0]["ports"] == 1
        evtchn.close()
    assert hypervisor.counters()["domains"][0]["ports"] == 0
    assert hypervisor.counters()["domains"][GUEST]["ports"] == 1


async def test_fileno_works_with_trio_wait_readable(
    backend: SimEventChannels, frontend: SimEventChannels
) -> None:
    be_port, fe_port = connect(backend, frontend)
    got: list[int] = []

    async def waiter() -> None:
        await trio.lowlevel.wait_readable(backend.fileno())
        got.extend(backend.read_pending())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()  # the waiter is parked in wait_readable
        assert got == []
        frontend.notify(fe_port)
    assert got == [be_port]
