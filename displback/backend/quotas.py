"""Per-guest accounts of every Dom0 resource a guest causes, so no guest can exhaust Dom0.

One :class:`Quota` per guest *domain* (owned by the daemon, shared by every vdispl device and
connection of that domain): a guest cannot escape its limits by re-handshaking, by using
several devices, or by holding resources past a teardown. It counts

========================  ===================================================================
resource                  charged for
========================  ===================================================================
``buffers``               each display buffer (DBUF_CREATE until DBUF_DESTROY)
``pages``                 guest pages mapped or exported in Dom0 and Dom0 pages granted to the
                          guest: live buffers and destroyed ones still waited for (deferred)
``framebuffers``          each FB_ATTACH until FB_DETACH (or its buffer's destroy)
``display_fbs``           display framebuffers Dom0 makes for the guest: an output's import of
                          a zero-copy buffer, each display-owned copy buffer (KMS objects)
``copy_bytes``            bytes of display-owned copy buffers (copy mode: two per framebuffer
                          and output it is shown on)
``deferred``              destroyed zero-copy buffers whose importer still holds them
``be_alloc_pages``        Dom0 memory granted to the guest (``be-alloc``), live or kept after
                          its destroy because the guest may still map it, until it dies
``be_alloc_buffers``      the dma-bufs (fds) holding that memory
========================  ===================================================================

``be_alloc_pages`` are also Dom0 grant entries (one per page granted to the guest), and
Dom0 has one grant table for every guest and every other Dom0 user: all guests' accounts
together are bounded by one daemon-wide :class:`GrantBudget` (``[limits]
dom0_grant_entries``, default :data:`DEFAULT_DOM0_GRANT_ENTRIES`).

A request that would pass a limit is answered with an error (``-ENOMEM`` for resources,
``-EINVAL`` for shapes no quota could allow) and the guest keeps working. Defaults
(:meth:`Limits.for_connectors`) derive from the connectors of the domain's connected devices
so that a correct Linux guest (xen-drm-front) never reaches them; each says why in its
docstring line. Releases that cannot be refused (a destroy must always be answered, a
deferred buffer stays mapped) are charged with :meth:`Quota.force`, which may pass a limit:
the next request that needs that resource is then refused.

An admin fixes any limit in the ``[limits]`` table of the configuration, for every guest or
for one guest by domid or domain name (:class:`LimitOverrides`): a limit given is used as
given, the others keep their derived value — derived from the limits given, so lowering
``max_buffers`` lowers ``max_framebuffers`` with it unless that is given too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Final

from displback.backend.clock import coarse_monotonic
from displback.protocol.constants import (
    EINVAL,
    ENOMEM,
    LINUX_MAX_CONNECTORS,
    LINUX_MAX_HEIGHT,
    LINUX_MAX_WIDTH,
    PAGE_SIZE,
    pages_for,
)
from displback.protocol.pagedir import dir_pages_for

__all__ = [
    "DEFAULT_DOM0_GRANT_ENTRIES",
    "DOM0_GRANT_ENTRIES",
    "DOM0_GRANT_KEY",
    "LIMIT_NAMES",
    "GrantBudget",
    "RESOURCES",
    "LimitOverrides",
    "Limits",
    "Quota",
    "QuotaExceeded",
    "TokenBucket",
    "limit_problem",
]

_MAX_BPP = 32
MIN_REQUESTS_PER_SECOND = 20.0
#: Each counted resource and the :class:`Limits` field that bounds it.
RESOURCES: Final = {
    "buffers": "max_buffers",
    "pages": "max_total_pages",
    "framebuffers": "max_framebuffers",
    "display_fbs": "max_display_fbs",
    "copy_bytes": "max_copy_bytes",
    "deferred": "max_deferred",
    "be_alloc_pages": "max_be_alloc_pages",
    "be_alloc_buffers": "max_be_alloc_buffers",
}


#: Entries of Dom0's grant table with Xen 4.17's defaults (``gnttab_max_frames`` 64 frames
#: of 4096 / 8 version-1 entries).
DOM0_GRANT_ENTRIES: Final = 64 * PAGE_SIZE // 8
#: Dom0 grant entries all guests' be-alloc memory may hold together: half of Xen's default
#: table (64 MiB of granted memory), so that the display never takes what Dom0's other grant
#: users need (its own PV frontends, gntalloc/vchan users, other backends with backend-
#: allocated buffers) while two 1080p be-alloc guests, triple-buffering, use under half of it.
DEFAULT_DOM0_GRANT_ENTRIES: Final = DOM0_GRANT_ENTRIES // 2
#: The ``[limits]`` key of the daemon-wide budget (not a per-guest limit).
DOM0_GRANT_KEY: Final = "dom0_grant_entries"


class QuotaExceeded(Exception):
    """A request would pass a limit: ``errno`` is what to answer (positive), ``limit`` which."""

    def __init__(self, limit: str, message: str, errno: int = ENOMEM) -> None:
        super().__init__(message)
        self.limit = limit
        self.errno = errno


@dataclass(frozen=True, slots=True)
class Limits:
    """What one guest domain may hold at once, and how fast it may ask.

    The last six limits may be given as 0: they are then derived from the others as
    :meth:`for_connectors` derives them (for limits an admin or a test sets by hand).
    """

    max_buffers: int
    max_pages_per_buffer: int
    max_total_pages: int
    max_dir_pages: int
    requests_per_second: float
    request_burst: int
    max_framebuffers: int = 0
    max_display_fbs: int = 0
    max_copy_bytes: int = 0
    max_deferred: int = 0
    max_be_alloc_pages: int = 0
    max_be_alloc_buffers: int = 0

    def __post_init__(self) -> None:
        for name in ("max_buffers", "max_pages_per_buffer", "max_total_pages", "request_burst"):
            if getattr(self, name) < 1:
                raise ValueError(f"limit {name} must be at least 1")
        if self.max_dir_pages < 1:
            raise ValueError("limit max_dir_pages must be at least 1")
        # The guest waits 3 s per request and may queue up to 32 on a ring: a slower rate
        # would time out requests of a guest that did nothing wrong.
        if not self.requests_per_second >= MIN_REQUESTS_PER_SECOND:
            raise ValueError(
                f"requests_per_second must be at least {MIN_REQUESTS_PER_SECOND} "
                "(32 queued requests within the guest's 3 s timeout)"
            )
        derived = _derived(self.max_buffers, self.max_total_pages, LINUX_MAX_CONNECTORS)
        for name, value in derived.items():
            current = getattr(self, name)
            if current < 0:
                raise ValueError(f"limit {name} must not be negative")
            if current == 0:
                object.__setattr__(self, name, value)

    @classmethod
    def for_connectors(
        cls,
        resolutions: Iterable[tuple[int, int]],
        overrides: Mapping[str, float] | None = None,
    ) -> Limits:
        """Defaults for a guest domain whose connected connectors have these resolutions,
        with ``overrides`` (limit name → value, an admin's) used as given.

        * ``max_pages_per_buffer``: the largest framebuffer Linux creates (4095×2047×32 bpp);
        * ``max_dir_pages``: the directory pages such a buffer needs;
        * ``max_total_pages``: triple buffering at every connector's resolution, plus one
          largest framebuffer (a mode change or a client's extra buffer);
        * ``max_buffers``: 8 per connector, at least 16 (Linux: 2–3 per CRTC, plus cursor-
          less clients' extras);
        * ``requests_per_second`` 2000, burst 400 (a 60 Hz guest sends about 60 per
          connector and second);
        * the rest as :func:`_derived` says.
        """
        given = dict(overrides or {})
        unknown = sorted(set(given) - set(LIMIT_NAMES))
        if unknown:
            raise ValueError(f"unknown limits: {', '.join(unknown)}")
        sizes = list(resolutions) or [(LINUX_MAX_WIDTH, LINUX_MAX_HEIGHT)]
        largest_fb = pages_for(LINUX_MAX_WIDTH * LINUX_MAX_HEIGHT * _MAX_BPP // 8)
        per_screen = [pages_for(w * h * _MAX_BPP // 8) for w, h in sizes]
        total = 3 * sum(per_screen) + largest_fb
        buffers = max(16, 8 * len(sizes))
        base: dict[str, float] = {
            "max_buffers": buffers,
            "max_pages_per_buffer": largest_fb,
            "max_total_pages": total,
            "max_dir_pages": dir_pages_for(largest_fb),
            "requests_per_second": 2000.0,
            "request_burst": 400,
        }
        base.update((k, v) for k, v in given.items() if k in base)
        derived = _derived(int(base["max_buffers"]), int(base["max_total_pages"]), len(sizes))
        derived.update((k, int(v)) for k, v in given.items() if k in derived)
        return cls(**base, **derived)  # type: ignore[arg-type]


def _derived(buffers: int, total_pages: int, connectors: int) -> dict[str, int]:
    """The limits that follow from the buffer limits (why each suffices for Linux).

    * ``max_framebuffers`` = 2 per buffer: Linux makes one framebuffer per ADDFB2; a
      client that re-adds one on the same buffer (a modeset) briefly holds two.
    * ``max_display_fbs`` = 2 per framebuffer and connector: an output holds one import or
      two copy buffers for each framebuffer shown on it.
    * ``max_copy_bytes`` = twice ``max_total_pages``: every copy buffer mirrors a framebuffer
      shown on an output, twice (one on screen, one being filled); a Linux guest shows on each
      connector its own (triple-buffered) framebuffers, which the page limit already holds.
    * ``max_deferred`` = 8: a destroyed buffer is deferred only while an output still holds it
      after the 2 s wait (one flip at most for a Linux guest).
    * ``max_be_alloc_pages`` = twice ``max_total_pages``: the live be-alloc buffers plus one
      whole earlier set that Dom0 keeps (and reuses) until the domain dies.
    * ``max_be_alloc_buffers`` = twice ``max_buffers``: kept memory is reused for any buffer
      it can hold, so only growing sizes add dma-bufs (one fd each in Dom0).
    """
    return {
        "max_framebuffers": 2 * buffers,
        "max_display_fbs": 2 * 2 * buffers * max(1, connectors),
        "max_copy_bytes": 2 * total_pages * PAGE_SIZE,
        "max_deferred": 8,
        "max_be_alloc_pages": 2 * total_pages,
        "max_be_alloc_buffers": 2 * buffers,
    }


#: Every limit, by the name of its :class:`Limits` field (the keys of ``[limits]``).
LIMIT_NAMES: Final = tuple(f.name for f in fields(Limits))


def limit_problem(name: str, value: object) -> str | None:
    """What is wrong with ``value`` as limit ``name`` given by an admin, or None if it fits.

    Every limit is an integer ≥ 1 (0 would mean "derive it" in :class:`Limits`: not a value
    an admin means), but ``requests_per_second``: a finite number ≥ 20 (see
    :meth:`Limits.__post_init__`).
    """
    if name not in LIMIT_NAMES:
        return "is not a limit"
    if isinstance(value, bool) or not isinstance(value, int | float):
        kind = "a number" if name == "requests_per_second" else "an integer"
        return f"must be {kind}, not {value!r}"
    if name == "requests_per_second":
        if not MIN_REQUESTS_PER_SECOND <= value < math.inf:
            return (
                f"must be a finite number ≥ {MIN_REQUESTS_PER_SECOND:g} (a guest queues up to "
                f"32 requests within its 3 s timeout), not {value!r}"
            )
        return None
    if not isinstance(value, int) or value < 1:
        return f"must be an integer ≥ 1, not {value!r}"
    return None


class GrantBudget:
    """Dom0 grant entries held for all guests together (one per be-alloc page granted,
    live or kept), against one daemon-wide ``limit``; every guest's :class:`Quota` charges
    it with its ``be_alloc_pages``."""

    def __init__(self, limit: int = DEFAULT_DOM0_GRANT_ENTRIES) -> None:
        if limit < 1:
            raise ValueError("dom0_grant_entries must be at least 1")
        self.limit = limit
        self.held = 0

    def check(self, amount: int) -> None:
        """Raise :class:`QuotaExceeded` (``ENOMEM``) unless ``amount`` more entries fit."""
        if self.held + amount > self.limit:
            raise QuotaExceeded(
                DOM0_GRANT_KEY,
                f"Dom0 grant entries held for all guests: {self.held}; {amount} more would "
                f"pass the daemon-wide limit {self.limit} ([limits] {DOM0_GRANT_KEY})",
            )


@dataclass(frozen=True)
class LimitOverrides:
    """Limits an admin fixed: for every guest (``common``), and per guest domain by domid or
    by name (``/local/domain/<domid>/name``, written by the toolstack). For one guest, its
    domid's entry wins over its name's, which wins over ``common``; a limit given nowhere
    keeps its derived value. Values are checked by :func:`limit_problem`."""

    common: Mapping[str, float] = field(default_factory=dict)
    by_domid: Mapping[int, Mapping[str, float]] = field(default_factory=dict)
    by_name: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    #: The daemon-wide :class:`GrantBudget` limit (``[limits] dom0_grant_entries``).
    dom0_grant_entries: int = DEFAULT_DOM0_GRANT_ENTRIES

    def for_guest(self, domid: int, name: str | None = None) -> dict[str, float]:
        """The limits fixed for guest domain ``domid`` called ``name`` (None: unknown)."""
        merged = dict(self.common)
        if name is not None:
            merged.update(self.by_name.get(name, {}))
        merged.update(self.by_domid.get(domid, {}))
        return merged


class Quota:
    """One guest domain's account: what it holds of each resource, against its limits.

    ``limits`` fixed (tests) or None: derived from the connectors of the domain's connected
    devices (:meth:`add_device`), the Linux maximum while none is. ``overrides`` (an admin's,
    by limit name; :meth:`configure`) are used as given either way. ``grant_budget``: the
    daemon-wide bound of all guests' ``be_alloc_pages`` (None: none).
    """

    def __init__(
        self,
        limits: Limits | None = None,
        *,
        domid: int | None = None,
        overrides: Mapping[str, float] | None = None,
        grant_budget: GrantBudget | None = None,
    ) -> None:
        self.domid = domid
        self.grant_budget = grant_budget
        self._fixed = limits
        self._overrides: dict[str, float] = dict(overrides or {})
        self._devices: dict[int, tuple[tuple[int, int], ...]] = {}
        self._limits = limits or Limits.for_connectors([])
        self._limiter: TokenBucket | None = None
        self._derive()
        self.buffers = 0
        self.pages = 0
        self.framebuffers = 0
        self.display_fbs = 0
        self.copy_bytes = 0
        self.deferred = 0
        self.be_alloc_pages = 0
        self.be_alloc_buffers = 0

    # -- limits --------------------------------------------------------------------------

    @property
    def limits(self) -> Limits:
        return self._limits

    def add_device(self, devid: int, resolutions: Iterable[tuple[int, int]]) -> None:
        """Device ``devid`` of this domain connected with these connectors."""
        self._devices[devid] = tuple(resolutions)
        self._derive()

    def remove_device(self, devid: int) -> None:
        """Device ``devid`` disconnected (what it still holds stays charged)."""
        self._devices.pop(devid, None)
        self._derive()

    @property
    def overrides(self) -> dict[str, float]:
        """The limits an admin fixed for this domain."""
        return dict(self._overrides)

    def configure(self, overrides: Mapping[str, float]) -> None:
        """Use ``overrides`` from now on (once the domain's name is known). The rate bucket
        is made anew: call this before a connection took :attr:`limiter`."""
        self._overrides = dict(overrides)
        self._limiter = None
        self._derive()

    def _derive(self) -> None:
        if self._fixed is not None:
            self._limits = replace(self._fixed, **self._overrides)  # type: ignore[arg-type]
        else:
            sizes = [size for device in self._devices.values() for size in device]
            self._limits = Limits.for_connectors(sizes, self._overrides)

    @property
    def limiter(self) -> TokenBucket:
        """The domain's request-rate bucket, shared by all its connectors."""
        if self._limiter is None:
            lim = self._limits
            self._limiter = TokenBucket(lim.requests_per_second, lim.request_burst)
        return self._limiter

    # -- generic accounting --------------------------------------------------------------

    def usage(self) -> dict[str, int]:
        """What the domain holds now, by resource."""
        return {name: int(getattr(self, name)) for name in RESOURCES}

    @property
    def idle(self) -> bool:
        """Nothing is charged."""
        return not any(self.usage().values())

    def check(self, resource: str, amount: int = 1) -> None:
        """Raise :class:`QuotaExceeded` (``ENOMEM``) unless ``amount`` more would fit."""
        limit_name = RESOURCES[resource]
        limit = getattr(self._limits, limit_name)
        held = getattr(self, resource)
        if held + amount > limit:
            raise QuotaExceeded(
                limit_name,
                f"guest holds {held} {resource.replace('_', ' ')}; {amount} more would pass "
                f"its limit {limit}",
            )
        if resource == "be_alloc_pages" and self.grant_budget is not None:
            self.grant_budget.check(amount)

    def take(self, resource: str, amount: int = 1) -> None:
        """Charge ``amount`` of ``resource`` if it fits, else raise :class:`QuotaExceeded`."""
        self.check(resource, amount)
        self._add(resource, amount)

    def force(self, resource: str, amount: int = 1) -> None:
        """Charge what cannot be refused (it may pass the limit; the next take fails)."""
        if resource not in RESOURCES or amount < 0:
            raise ValueError(f"cannot charge {amount} {resource}")
        self._add(resource, amount)

    def give(self, resource: str, amount: int = 1) -> None:
        """Give back ``amount`` of ``resource``."""
        held = getattr(self, resource)
        if amount < 0 or held < amount or resource not in RESOURCES:
            raise RuntimeError(f"quota released {amount} {resource}, only {held} charged")
        self._add(resource, -amount)

    def _add(self, resource: str, amount: int) -> None:
        setattr(self, resource, getattr(self, resource) + amount)
        if resource == "be_alloc_pages" and self.grant_budget is not None:
            self.grant_budget.held += amount

    # -- buffers -------------------------------------------------------------------------

    def check_buffer(self, npages: int) -> None:
        """Raise :class:`QuotaExceeded` unless a buffer of ``npages`` pages may be created."""
        lim = self._limits
        if dir_pages_for(npages) > lim.max_dir_pages:
            raise QuotaExceeded(
                "max_dir_pages",
                f"buffer needs {dir_pages_for(npages)} directory pages, limit {lim.max_dir_pages}",
                EINVAL,
            )
        if npages > lim.max_pages_per_buffer:
            raise QuotaExceeded(
                "max_pages_per_buffer",
                f"buffer of {npages} pages exceeds the per-buffer limit {lim.max_pages_per_buffer}",
                EINVAL,
            )
        if self.buffers + 1 > lim.max_buffers:
            raise QuotaExceeded(
                "max_buffers", f"guest already holds {self.buffers} buffers (limit)"
            )
        if self.pages + npages > lim.max_total_pages:
            raise QuotaExceeded(
                "max_total_pages",
                f"{self.pages} + {npages} pages exceed the guest's limit {lim.max_total_pages}",
            )

    def charge(self, npages: int) -> None:
        """Account a created buffer (after :meth:`check_buffer` passed)."""
        self.check_buffer(npages)
        self.buffers += 1
        self.pages += npages

    def release(self, npages: int) -> None:
        """Give back a destroyed buffer's share (count and pages)."""
        if self.buffers < 1 or self.pages < npages:
            raise RuntimeError("quota released more than it was charged")
        self.buffers -= 1
        self.pages -= npages


class TokenBucket:
    """Requests per second with a burst allowance; the clock is injectable for tests. It is
    read for every request: by default the coarse clock, which costs no system call
    (displback.backend.clock)."""

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = coarse_monotonic
    ) -> None:
        if not rate > 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock()

    def take(self) -> bool:
        """Spend one token if there is one; ``False`` means: refuse this request."""
        now = self._clock()
        elapsed = max(0.0, now - self._last)
        self._last = now
        self._tokens = min(float(self.burst), self._tokens + elapsed * self.rate)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def seconds_until_token(self) -> float:
        """How long until :meth:`take` would succeed (0 if now)."""
        missing = 1.0 - self._tokens
        return 0.0 if missing <= 0 else math.ceil(missing / self.rate * 1000) / 1000
