"""Limits an admin fixes for one guest ([limits.guest.<name or domid>]) apply to that guest
only, found by domid or by the toolstack's name of the domain — never by a name the guest
wrote itself."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from displback.backend.device import BackendSettings
from displback.backend.quotas import LimitOverrides, Limits
from displback.protocol.constants import ENOMEM
from displback.sim.guest import GuestBuffer, GuestRequestError, SimGuest
from displback.sim.hypervisor import HypervisorThread
from displback.xenstore.wire import Perm
from tests.backend.support import connected_guest

SPEC = "connectors=c0:320x240"


async def _small(guest: SimGuest) -> GuestBuffer:
    return await guest.create_dumb(64, 64, 32)


async def _fill(guest: SimGuest, count: int) -> list[GuestBuffer]:
    return [await _small(guest) for _ in range(count)]


async def _empty(guest: SimGuest, bufs: list[GuestBuffer]) -> None:
    for buf in bufs:
        await guest.destroy_dumb(buf)


@pytest.mark.parametrize(
    "overrides",
    [
        LimitOverrides(by_name={"guest2": {"max_buffers": 2}}),
        LimitOverrides(by_domid={2: {"max_buffers": 2}}),
        # The domid's entry wins over the name's, which wins over every guest's.
        LimitOverrides(
            common={"max_buffers": 1},
            by_name={"guest1": {"max_buffers": 6}, "guest2": {"max_buffers": 5}},
            by_domid={2: {"max_buffers": 2}},
        ),
    ],
    ids=["by-name", "by-domid", "precedence"],
)
async def test_an_override_lowers_one_guests_buffers_and_not_anothers(
    hypervisor: HypervisorThread, tmp_path: Path, overrides: LimitOverrides
) -> None:
    settings = BackendSettings(limit_overrides=overrides)
    with trio.fail_after(30):
        async with connected_guest(hypervisor, tmp_path, SPEC, settings=settings) as (w, one):
            await w.add_guest(2, SPEC)
            async with w.guest(2) as two:
                await two.wait_connected()
                held = await _fill(two, 2)
                with pytest.raises(GuestRequestError) as exc:
                    await _small(two)
                assert exc.value.errno == ENOMEM
                assert two.pending_end_access == 0
                # The other guest is unaffected: it holds more than guest 2 may.
                others = await _fill(one, 5)
                assert w.backend.accounts[1].limits.max_buffers >= 5
                assert w.backend.accounts[2].limits.max_buffers == 2
                # Limits not given keep following the ones given (2 framebuffers a buffer).
                assert w.backend.accounts[2].limits.max_framebuffers == 4
                await _empty(one, others)
                await _empty(two, held)
                # Room again: the same request passes.
                await _empty(two, [await _small(two)])


async def test_a_domain_name_the_guest_could_have_written_is_not_believed(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    overrides = LimitOverrides(by_name={"guest2": {"max_buffers": 2}})
    settings = BackendSettings(limit_overrides=overrides)
    with trio.fail_after(30):
        async with connected_guest(hypervisor, tmp_path, SPEC, settings=settings) as (w, _):
            w.toolstack.create_domain(2, "guest2")
            # As if the guest owned its name node (libxl never does this).
            w.xs.xenstored.session(0).set_perms("/local/domain/2/name", [Perm(2, "n")])
            await w.xs.add_domain_socket(2)
            await w.add_guest(2, SPEC)
            async with w.guest(2) as two:
                await two.wait_connected()
                held = await _fill(two, 3)
                assert w.backend.accounts[2].limits == Limits.for_connectors([(320, 240)])
                await _empty(two, held)


def test_a_limit_given_is_used_and_the_ones_it_bounds_follow_it() -> None:
    derived = Limits.for_connectors([(640, 480)])
    fixed = Limits.for_connectors([(640, 480)], {"max_buffers": 4, "max_deferred": 3})
    assert fixed.max_buffers == 4 and fixed.max_deferred == 3
    assert fixed.max_framebuffers == 8 and fixed.max_be_alloc_buffers == 8
    assert fixed.max_total_pages == derived.max_total_pages
    with pytest.raises(ValueError, match="unknown limits: max_bufers"):
        Limits.for_connectors([], {"max_bufers": 4})
