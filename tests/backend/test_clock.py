"""The coarse clock of the backend's per-request bookkeeping (displback.backend.clock)."""

from __future__ import annotations

import time

from displback.backend import clock
from displback.backend.quotas import TokenBucket


def test_the_coarse_clock_is_the_monotonic_clock_to_a_tick() -> None:
    before = time.monotonic()
    coarse = clock.coarse_monotonic()
    after = time.monotonic()
    tick = time.clock_getres(clock.CLOCK_MONOTONIC_COARSE)
    assert 0 < tick <= 0.1  # a kernel tick: 1-10 ms
    # CLOCK_MONOTONIC as of the last tick (a tick late, or a few where a VM delays them): the
    # same clock, never ahead.
    assert before - max(0.05, 10 * tick) <= coarse <= after
    readings = [clock.coarse_monotonic() for _ in range(1000)]
    assert readings == sorted(readings)


def test_the_coarse_clock_advances() -> None:
    start = clock.coarse_monotonic()
    time.sleep(0.1)
    assert 0.05 <= clock.coarse_monotonic() - start <= 5.0


def test_a_token_bucket_reads_the_coarse_clock_by_default() -> None:
    bucket = TokenBucket(rate=10, burst=1)
    assert bucket._clock is clock.coarse_monotonic
