"""The arena's invariants can fail: an attack that stalls Dom0's event loop, or one that
leaves a quota exceeded, is caught."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio

from displback.backend.quotas import Limits, Quota
from displback.sim.guest import SimGuest
from displback.sim.hypervisor import HypervisorThread
from tests.hostile.support import Arena, quota_violations, run_attack


async def test_an_attack_that_stalls_the_event_loop_fails_the_rate_check(
    hypervisor: HypervisorThread, tmp_path: Path
) -> None:
    async def stall(a: Arena, g: SimGuest) -> None:
        for _ in range(4):
            time.sleep(0.3)  # noqa: ASYNC251 — the point: Dom0's loop blocked 3 frames
            await trio.sleep(0.02)

    with pytest.raises(BaseException) as caught:  # noqa: PT011 — in nurseries' groups
        await run_attack(hypervisor, tmp_path, stall)
    assert any("honest flips per" in str(e) for e in _leaves(caught.value))


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def test_a_counter_over_its_limit_is_a_quota_violation() -> None:
    quota = Quota(Limits.for_connectors([(320, 240)]))
    assert quota_violations(quota) == []
    quota.force("framebuffers", quota.limits.max_framebuffers + 1)
    assert quota_violations(quota) == [
        f"framebuffers = {quota.limits.max_framebuffers + 1} > {quota.limits.max_framebuffers}"
    ]
