"""Per-guest limits: derived defaults, buffer/page accounting, request rate."""

import pytest

from displback.backend.quotas import (
    GrantBudget,
    Limits,
    Quota,
    QuotaExceeded,
    TokenBucket,
    limit_problem,
)
from displback.protocol.constants import (
    EINVAL,
    ENOMEM,
    LINUX_MAX_CONNECTORS,
    PAGE_SIZE,
    pages_for,
)


def test_defaults_allow_triple_buffering_on_every_connector_plus_the_largest_fb() -> None:
    lim = Limits.for_connectors([(1920, 1080), (1024, 768)])
    full_hd, xga = pages_for(1920 * 1080 * 4), pages_for(1024 * 768 * 4)
    quota = Quota(lim)
    for _ in range(3):
        quota.charge(full_hd)
        quota.charge(xga)
    quota.charge(pages_for(4095 * 2047 * 4))
    assert quota.buffers == 7
    with pytest.raises(QuotaExceeded) as exc:
        quota.charge(full_hd)
    assert exc.value.limit == "max_total_pages" and exc.value.errno == ENOMEM


def test_a_buffer_larger_than_linux_can_create_is_invalid() -> None:
    quota = Quota(Limits.for_connectors([(800, 600)]))
    with pytest.raises(QuotaExceeded) as exc:
        quota.check_buffer(pages_for(4096 * 2048 * 4))
    assert exc.value.limit == "max_pages_per_buffer" and exc.value.errno == EINVAL


def test_buffer_count_is_limited_and_released_buffers_free_their_share() -> None:
    lim = Limits(
        max_buffers=2,
        max_pages_per_buffer=10,
        max_total_pages=100,
        max_dir_pages=1,
        requests_per_second=100,
        request_burst=1,
    )
    quota = Quota(lim)
    quota.charge(1)
    quota.charge(1)
    with pytest.raises(QuotaExceeded) as exc:
        quota.charge(1)
    assert exc.value.limit == "max_buffers"
    quota.release(1)
    quota.charge(1)
    assert (quota.buffers, quota.pages) == (2, 2)


def test_releasing_more_than_charged_is_a_bug_not_a_quota() -> None:
    quota = Quota(Limits.for_connectors([(640, 480)]))
    with pytest.raises(RuntimeError):
        quota.release(1)


def test_limits_refuse_inconsistent_settings() -> None:
    with pytest.raises(ValueError):
        Limits(0, 1, 1, 1, 100.0, 10)
    with pytest.raises(ValueError):
        Limits(1, 1, 1, 0, 100.0, 10)
    with pytest.raises(ValueError, match="at least 20"):
        Limits(1, 1, 1, 1, 5.0, 10)  # 32 queued requests would outlast the guest's 3 s


def test_the_directory_limit_refuses_on_its_own() -> None:
    quota = Quota(Limits(4, 5000, 5000, 1, 100.0, 10))
    quota.check_buffer(1023)
    with pytest.raises(QuotaExceeded) as exc:
        quota.check_buffer(1024)  # fits the per-buffer limit, needs a second directory page
    assert exc.value.limit == "max_dir_pages" and exc.value.errno == EINVAL


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    now = [0.0]
    bucket = TokenBucket(rate=10, burst=3, clock=lambda: now[0])
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    assert bucket.seconds_until_token() == pytest.approx(0.1)
    now[0] += 0.1
    assert bucket.take() and not bucket.take()
    now[0] += 100.0
    assert sum(bucket.take() for _ in range(10)) == 3


@pytest.mark.parametrize("connectors", [3, 4, 8])
def test_each_connected_connector_brings_eight_buffers_and_their_display_slots(
    connectors: int,
) -> None:
    """A domain's allowance grows with its connected connectors: 8 buffers each (at least
    16), each framebuffer shown on every connector with 2 display slots (an import, or two
    copy buffers). Two devices of the domain add up; a disconnected one gives its share
    back."""
    quota = Quota(domid=1)
    quota.add_device(0, [(640, 480)] * (connectors - 1))
    quota.add_device(1, [(320, 240)])
    allowed = 8 * connectors
    for _ in range(allowed):
        quota.charge(1)
    with pytest.raises(QuotaExceeded) as exc:
        quota.charge(1)
    assert exc.value.limit == "max_buffers"
    # Every framebuffer on every connector, twice: fits; one more does not.
    slots = 2 * 2 * allowed * connectors
    quota.take("display_fbs", slots)
    with pytest.raises(QuotaExceeded) as exc:
        quota.take("display_fbs")
    assert exc.value.limit == "max_display_fbs"
    quota.give("display_fbs", slots)
    quota.remove_device(0)
    assert quota.limits.max_buffers == 16  # one connector left: the floor
    with pytest.raises(QuotaExceeded):
        quota.charge(1)  # what is held stays charged


def test_limits_given_as_zero_are_derived_as_documented() -> None:
    """_derived's rules: 2 framebuffers per buffer, 2 display slots per framebuffer and
    connector (every connector Linux may have), copies twice the pages, 8 deferred, backend
    allocations twice the live ones."""
    lim = Limits(max_buffers=5, max_pages_per_buffer=10, max_total_pages=100,
                 max_dir_pages=1, requests_per_second=100, request_burst=1)
    assert (lim.max_framebuffers, lim.max_display_fbs, lim.max_copy_bytes) == (
        10, 2 * 2 * 5 * LINUX_MAX_CONNECTORS, 2 * 100 * PAGE_SIZE)
    assert (lim.max_deferred, lim.max_be_alloc_pages, lim.max_be_alloc_buffers) == (8, 200, 10)
    given = Limits(5, 10, 100, 1, 100, 1, max_framebuffers=3, max_deferred=1)
    assert (given.max_framebuffers, given.max_deferred) == (3, 1)  # as given, not derived
    assert given.max_be_alloc_buffers == 10


@pytest.mark.parametrize(
    "name", ["max_buffers", "max_pages_per_buffer", "max_total_pages", "request_burst",
             "max_dir_pages"],
)
def test_every_base_limit_must_be_at_least_one(name: str) -> None:
    fields = {"max_buffers": 1, "max_pages_per_buffer": 1, "max_total_pages": 1,
              "max_dir_pages": 1, "requests_per_second": 20.0, "request_burst": 1}
    Limits(**fields)  # type: ignore[arg-type]  # the smallest valid limits
    with pytest.raises(ValueError, match=name):
        Limits(**{**fields, name: 0})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_deferred must not be negative"):
        Limits(**fields, max_deferred=-1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="requests_per_second"):
        Limits(**{**fields, "requests_per_second": float("nan")})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        ("max_buffers", 1, None),
        ("requests_per_second", 20, None),
        ("requests_per_second", 20.5, None),
        ("max_bufers", 1, "is not a limit"),
        ("max_buffers", True, "must be an integer, not True"),
        ("requests_per_second", "fast", "must be a number, not 'fast'"),
        ("max_buffers", 0, "must be an integer ≥ 1, not 0"),
        ("max_buffers", 2.5, "must be an integer ≥ 1, not 2.5"),
        ("requests_per_second", 19.9, "must be a finite number ≥ 20"),
        ("requests_per_second", float("inf"), "must be a finite number ≥ 20"),
    ],
)
def test_an_admins_limit_is_checked_with_a_clear_problem(
    name: str, value: object, problem: str | None
) -> None:
    found = limit_problem(name, value)
    if problem is None:
        assert found is None
    else:
        assert found is not None and found.startswith(problem)


def test_every_guests_be_alloc_pages_share_one_daemon_wide_grant_budget() -> None:
    budget = GrantBudget(100)
    one = Quota(Limits(16, 200, 200, 1, 2000.0, 400), domid=1, grant_budget=budget)
    two = Quota(Limits(16, 200, 200, 1, 2000.0, 400), domid=2, grant_budget=budget)
    one.take("be_alloc_pages", 60)
    two.take("be_alloc_pages", 40)
    assert budget.held == 100
    with pytest.raises(QuotaExceeded) as exc:
        two.take("be_alloc_pages", 1)  # within guest 2's own limit, over the budget
    assert exc.value.limit == "dom0_grant_entries" and exc.value.errno == ENOMEM
    assert "daemon-wide limit 100" in str(exc.value) and two.be_alloc_pages == 40
    one.force("be_alloc_pages", 5)  # adopted at a restart: never refused
    assert budget.held == 105
    one.give("be_alloc_pages", 65)
    two.take("be_alloc_pages", 1)
    assert budget.held == 41
    with pytest.raises(ValueError):
        GrantBudget(0)
