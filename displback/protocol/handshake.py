"""The backend's XenbusState handshake for one vdispl device, as a sans-I/O transition table.

Theory of operation
===================

One :class:`Handshake` per vdispl device (backend directory ``…/vdispl/F/D``). It never touches
XenStore, grant tables or event channels: the I/O layer feeds it *inputs* and carries out the
*actions* it returns, in order, before feeding the next input::

    actions = handshake.handle(Observed(frontend=..., backend=..., online=...), now)

Inputs
------
``Observed``
    The *current* values of the frontend ``state``, our backend ``state`` and ``online``,
    re-read whenever a watch fires for the device (watch events can be coalesced or spurious,
    so only current values count, never the sequence of changes).
``ConnectSucceeded`` / ``ConnectFailed``
    The outcome of a :class:`Connect` action. Ring processing starts only after success has
    been fed in; a problem found while connecting is a ``ConnectFailed``.
``ProtocolViolation``
    The guest broke the protocol on a connected ring (bad index, impossible request, ...).
``TeardownDone``
    A :class:`Teardown` action finished: everything mapped, bound or exported is released.
``Vanished``
    The backend directory disappeared (the toolstack removed the device). A missing frontend
    directory is not this: it is observed as a frontend in state Closed.
``Tick``
    A :class:`WakeAt` deadline passed. Time is an input (``now``), never a sleep.
``Shutdown``
    The daemon stops (SIGTERM): release everything, tell the guest Closed, forget the device.

Actions
-------
:class:`WriteState` (write our ``state``, see ``layout.backend_state_writes``),
:class:`Connect` (read config and transport nodes, map rings, bind channels),
:class:`Teardown` (release everything for this device), :class:`WakeAt` (feed ``Tick`` at or
after a deadline), :class:`Forget` (all released and nothing more will be written: drop the
device). ``Forget`` is the last action a machine ever emits.

How it decides
--------------
The machine is a *phase* (our own progress, :class:`Phase`) plus latched facts from the
inputs. Each input becomes a *trigger*: local results are triggers themselves; observations
update the facts, from which the current *level* trigger is derived, by priority:
``VANISHED`` > ``REMOVE`` (``online`` = 0 or libxl wrote ``state`` = 5; latched) > the class of
the frontend state. ``_TABLE[(phase, trigger)]`` says what happens. After every input the
level trigger is re-applied until the phase stops changing ("settling"), so a state the
frontend reached while we were busy is acted on as soon as we are ready, without waiting for
another watch event. Every (phase, trigger) pair has an explicit row: a transition, ``STAY``
(nothing to do, e.g. a late violation report after teardown), or ``MISUSE`` (a local result
that cannot happen in this phase: the I/O layer is broken, :class:`HandshakeUsageError`).
Everything that affects the handshake lives in this file.

The rows, following displif-reference §2:

* Fresh device (our ``state`` is 1): write InitWait at once (libxl waits only 10 s). On
  frontend 3 (Initialised): ``Connect``; on success write Connected (§2.1).
* Daemon (re)start finding our ``state`` ≠ 1: write Closed so the frontend drops rings from
  a previous life, then offer InitWait again once the frontend is Initialising, Initialised
  (Linux ignores Closed while it has no DRM device, so a frontend stuck at 3 still holds fresh
  rings) or closing/closed. A frontend that shows Connected while we hold nothing is never
  attached to: we write Closed and wait for it to reset.
* Frontend → 5/6/0, or → 1 while we are connecting or connected: ``Teardown``; when done write
  Closed then InitWait (the Linux remove path polls for InitWait). A frontend *directory* that
  is gone while ours remains reads as Closed (the guest may remove it; libxl's forced removal
  does, in the same transaction as its Closing): only the backend directory's end is
  ``Vanished``. Resets of a connection younger than ``RetryPolicy.stable_after`` count towards
  the back-off: the first in a row is reoffered at once, later ones after the back-off, so a
  guest cannot make us map and unmap its rings in a tight loop.
* libxl removal (``online`` 0 / ``state`` 5): ``Teardown`` if needed, write Closed, then stay
  until the directories vanish. A removed device is never revived.
* Protocol violation or failed connect: ``Teardown``, write Closed, and offer InitWait again
  only after a back-off delay (:class:`RetryPolicy`) and once the frontend has reset.
* Backend directory vanished: ``Teardown`` if needed, then ``Forget``; no more writes.
* Daemon shutdown: ``Teardown`` if needed (a connect under way finishes first), write Closed
  (so the frontend sees its backend gone and re-handshakes with the next daemon), ``Forget``.
  A device already removed or vanished only finishes that.

The Linux frontend reads our *current* state when its watch fires, so of two quick writes
(Closed then InitWait) it may see only the second. Both orders are harmless: Closed alone makes
it tear down and reinitialise, InitWait alone does the same (it disconnects on InitWait too),
and it ignores Closing and Initialised from us entirely — we never write those.

``state`` is ours: if an observation shows a value we did not write (other than libxl's 5),
our last written state is re-asserted.

One variant, ``frontend_connects_first`` (vkbd: Linux's ``xen-kbdfront``): that frontend
publishes its page and goes Initialised at probe, and goes Connected as soon as it sees our
InitWait — without waiting for our Connected, and again (with the *same* page and channel,
which it never frees while the device lives) when we offer InitWait after a reset. So in
``INIT_WAIT`` a frontend in Connected (4) is connected to like one in Initialised (3); every
other row is the same. vdispl's frontend never shows 4 before our Connected: there it means
rings from an earlier life, never attached to.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Final

from displback.protocol.xenbus import XenbusState

__all__ = [
    "Action",
    "Connect",
    "ConnectFailed",
    "ConnectSucceeded",
    "Forget",
    "Handshake",
    "HandshakeUsageError",
    "Input",
    "Observed",
    "Phase",
    "ProtocolViolation",
    "RetryPolicy",
    "Shutdown",
    "Teardown",
    "TeardownDone",
    "Tick",
    "Vanished",
    "WakeAt",
    "WriteState",
]


class HandshakeUsageError(RuntimeError):
    """A local result arrived in a phase where it cannot happen (a bug in the I/O layer)."""


# --- inputs ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Observed:
    """Current values of the frontend ``state``, our ``state`` and our ``online`` nodes."""

    frontend: XenbusState
    backend: XenbusState
    online: bool


@dataclass(frozen=True, slots=True)
class ConnectSucceeded:
    """Every connector's ring and event page are mapped and both channels bound."""


@dataclass(frozen=True, slots=True)
class ConnectFailed:
    """Connecting failed (bad transport nodes, mapping or binding refused); partial state kept
    until the :class:`Teardown` that follows."""

    reason: str


@dataclass(frozen=True, slots=True)
class ProtocolViolation:
    """The guest broke the protocol on a connected device."""

    reason: str


@dataclass(frozen=True, slots=True)
class TeardownDone:
    """The last :class:`Teardown` has released everything."""


@dataclass(frozen=True, slots=True)
class Vanished:
    """The backend directory of the device is gone."""


@dataclass(frozen=True, slots=True)
class Tick:
    """A :class:`WakeAt` deadline has passed."""


@dataclass(frozen=True, slots=True)
class Shutdown:
    """The daemon is stopping."""


Input = (
    Observed
    | ConnectSucceeded
    | ConnectFailed
    | ProtocolViolation
    | TeardownDone
    | Vanished
    | Tick
    | Shutdown
)

# --- actions --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WriteState:
    """Write our backend ``state`` (plus what ``layout.backend_state_writes`` adds)."""

    state: XenbusState


@dataclass(frozen=True, slots=True)
class Connect:
    """Read the frontend's configuration and transport nodes, map, bind; report the result."""


@dataclass(frozen=True, slots=True)
class Teardown:
    """Stop ring processing and release everything of this device; then feed ``TeardownDone``."""

    reason: str


@dataclass(frozen=True, slots=True)
class WakeAt:
    """Feed :class:`Tick` at or after ``deadline`` (same clock as ``now``); latest one wins."""

    deadline: float


@dataclass(frozen=True, slots=True)
class Forget:
    """Nothing is held and nothing more will be written: drop this device."""


Action = WriteState | Connect | Teardown | WakeAt | Forget


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Back-off before offering InitWait again after a failure (violation, failed connect).

    The n-th consecutive failure waits ``min(initial * factor ** (n - 1), maximum)`` seconds;
    a connection that stayed up for ``stable_after`` seconds clears the count.
    """

    initial: float = 1.0
    factor: float = 2.0
    maximum: float = 60.0
    stable_after: float = 60.0

    def delay(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th consecutive failure (``failures`` ≥ 1)."""
        return min(self.initial * self.factor ** min(failures - 1, 64), self.maximum)


# --- phases, triggers and the table ---------------------------------------------------------


class Phase(enum.Enum):
    """Where this backend is in the handshake (our progress, not a XenbusState)."""

    NEW = "new"  # nothing observed or written yet
    INIT_WAIT = "init-wait"  # wrote InitWait; waiting for the frontend's transport
    CONNECTING = "connecting"  # Connect emitted; waiting for its result
    CONNECTING_THEN_REOFFER = "connecting-then-reoffer"  # ... frontend reset meanwhile
    CONNECTING_THEN_REMOVE = "connecting-then-remove"  # ... toolstack removal meanwhile
    CONNECTING_THEN_FORGET = "connecting-then-forget"  # ... directories vanished meanwhile
    CONNECTING_THEN_STOP = "connecting-then-stop"  # ... the daemon stops meanwhile
    CONNECTED = "connected"  # wrote Connected; rings live
    TEARDOWN_REOFFER = "teardown-reoffer"  # Teardown emitted; then Closed, InitWait
    TEARDOWN_BACKOFF = "teardown-backoff"  # Teardown emitted; then Closed, back-off
    TEARDOWN_REMOVE = "teardown-remove"  # Teardown emitted; then Closed for good
    TEARDOWN_FORGET = "teardown-forget"  # Teardown emitted; then Forget
    TEARDOWN_STOP = "teardown-stop"  # Teardown emitted; then Closed and Forget (shutdown)
    CLOSING_HOLD = "closing-hold"  # torn down; our Closing held until the frontend answers
    CLOSED = "closed"  # wrote Closed; will offer InitWait again
    REMOVED = "removed"  # wrote Closed for the toolstack; waiting to vanish
    GONE = "gone"  # forgotten; terminal


class _Trigger(enum.Enum):
    # Levels, derived from the latched facts (highest priority first).
    VANISHED = "vanished"
    REMOVE = "remove"
    FE_INITIALISING = "frontend 1"
    FE_PUBLISHED = "frontend 3"
    FE_CONNECTED = "frontend 4"
    FE_CLOSED = "frontend 0/5/6"
    FE_BUSY = "frontend 2/7/8"
    # Events: results of our own actions, and ring-level violations.
    CONNECT_OK = "connect ok"
    CONNECT_FAILED = "connect failed"
    VIOLATION = "violation"
    TEARDOWN_DONE = "teardown done"
    SHUTDOWN = "shutdown"


_FE_CLASS: Final = {
    XenbusState.UNKNOWN: _Trigger.FE_CLOSED,
    XenbusState.INITIALISING: _Trigger.FE_INITIALISING,
    XenbusState.INIT_WAIT: _Trigger.FE_BUSY,
    XenbusState.INITIALISED: _Trigger.FE_PUBLISHED,
    XenbusState.CONNECTED: _Trigger.FE_CONNECTED,
    XenbusState.CLOSING: _Trigger.FE_CLOSED,
    XenbusState.CLOSED: _Trigger.FE_CLOSED,
    XenbusState.RECONFIGURING: _Trigger.FE_BUSY,
    XenbusState.RECONFIGURED: _Trigger.FE_BUSY,
}
_LEVELS: Final = frozenset(_FE_CLASS.values()) | {_Trigger.VANISHED, _Trigger.REMOVE}
_EVENTS: Final = frozenset(_Trigger) - _LEVELS


class _Do(enum.Enum):
    """Action templates; ``TEARDOWN`` takes its reason from the trigger."""

    WRITE_INIT_WAIT = "write 2"
    WRITE_CONNECTED = "write 4"
    WRITE_CLOSING = "write 5"
    WRITE_CLOSED = "write 6"
    CONNECT = "connect"
    TEARDOWN = "teardown"
    FORGET = "forget"


@dataclass(frozen=True, slots=True)
class _Go:
    """Move to ``target`` emitting ``actions``; ``failure`` counts towards the back-off."""

    target: Phase
    actions: tuple[_Do, ...] = ()
    failure: bool = False
    free: bool = False  # a failure that counts but costs no delay this time


class _Rule(enum.Enum):
    STAY = "stay"  # nothing to do in this phase
    MISUSE = "misuse"  # cannot happen: HandshakeUsageError
    BEGIN = "begin"  # NEW: fresh → InitWait; stale → Closed
    OFFER = "offer"  # CLOSED: InitWait once the back-off has passed, else WakeAt
    RESET = "reset"  # the guest dropped a connection: reoffer at once, or back off
    TORN_DOWN = "torn down"  # TEARDOWN_REOFFER/BACKOFF done: hold our Closing, or go on
    HOLD = "hold"  # CLOSING_HOLD: go on once the frontend left Closing or the hold is over


STAY: Final = _Rule.STAY
MISUSE: Final = _Rule.MISUSE

_T = _Trigger
_P = Phase
_D = _Do
_FE_ALL: Final = (_T.FE_INITIALISING, _T.FE_PUBLISHED, _T.FE_CONNECTED, _T.FE_CLOSED, _T.FE_BUSY)
_FE_RESET: Final = (_T.FE_INITIALISING, _T.FE_CLOSED)  # the frontend dropped its connection


def _rows(
    phase: Phase, triggers: tuple[_Trigger, ...], rule: _Go | _Rule
) -> dict[tuple[Phase, _Trigger], _Go | _Rule]:
    return {(phase, t): rule for t in triggers}


_CONNECTING_THEN = {
    _P.CONNECTING_THEN_REMOVE: _P.TEARDOWN_REMOVE,
    _P.CONNECTING_THEN_STOP: _P.TEARDOWN_STOP,
    _P.CONNECTING_THEN_FORGET: _P.TEARDOWN_FORGET,
}
_CONNECTING_THEN_ANY: Final = frozenset({*_CONNECTING_THEN, _P.CONNECTING_THEN_REOFFER})
_TEARDOWNS = {
    _P.TEARDOWN_REOFFER: _Go(_P.INIT_WAIT, (_D.WRITE_CLOSED, _D.WRITE_INIT_WAIT)),
    _P.TEARDOWN_BACKOFF: _Go(_P.CLOSED, (_D.WRITE_CLOSED,)),
    _P.TEARDOWN_REMOVE: _Go(_P.REMOVED, (_D.WRITE_CLOSED,)),
    _P.TEARDOWN_FORGET: _Go(_P.GONE, (_D.FORGET,)),
    _P.TEARDOWN_STOP: _Go(_P.GONE, (_D.WRITE_CLOSED, _D.FORGET)),
}

_TABLE: Final[dict[tuple[Phase, _Trigger], _Go | _Rule]] = {
    # NEW: the first observation decides between a fresh and a stale device.
    **_rows(_P.NEW, _FE_ALL, _Rule.BEGIN),
    (_P.NEW, _T.REMOVE): _Go(_P.REMOVED, (_D.WRITE_CLOSED,)),
    (_P.NEW, _T.VANISHED): _Go(_P.GONE, (_D.FORGET,)),
    # INIT_WAIT: connect to freshly published rings, never to rings already in use.
    **_rows(_P.INIT_WAIT, (_T.FE_INITIALISING, _T.FE_CLOSED, _T.FE_BUSY), STAY),
    (_P.INIT_WAIT, _T.FE_PUBLISHED): _Go(_P.CONNECTING, (_D.CONNECT,)),
    (_P.INIT_WAIT, _T.FE_CONNECTED): _Go(_P.CLOSED, (_D.WRITE_CLOSED,), failure=True),
    (_P.INIT_WAIT, _T.REMOVE): _Go(_P.REMOVED, (_D.WRITE_CLOSED,)),
    (_P.INIT_WAIT, _T.VANISHED): _Go(_P.GONE, (_D.FORGET,)),
    # CONNECTING: remember what happened meanwhile, act on it once the result is in.
    **_rows(_P.CONNECTING, (_T.FE_PUBLISHED, _T.FE_CONNECTED, _T.FE_BUSY), STAY),
    **_rows(_P.CONNECTING, _FE_RESET, _Go(_P.CONNECTING_THEN_REOFFER)),
    (_P.CONNECTING, _T.REMOVE): _Go(_P.CONNECTING_THEN_REMOVE),
    (_P.CONNECTING, _T.VANISHED): _Go(_P.CONNECTING_THEN_FORGET),
    (_P.CONNECTING, _T.CONNECT_OK): _Go(_P.CONNECTED, (_D.WRITE_CONNECTED,)),
    (_P.CONNECTING, _T.CONNECT_FAILED): _Go(_P.TEARDOWN_BACKOFF, (_D.TEARDOWN,), failure=True),
    **_rows(_P.CONNECTING_THEN_REOFFER, _FE_ALL, STAY),
    (_P.CONNECTING_THEN_REOFFER, _T.REMOVE): _Go(_P.CONNECTING_THEN_REMOVE),
    (_P.CONNECTING_THEN_REOFFER, _T.VANISHED): _Go(_P.CONNECTING_THEN_FORGET),
    **_rows(_P.CONNECTING_THEN_REMOVE, (*_FE_ALL, _T.REMOVE), STAY),
    (_P.CONNECTING_THEN_REMOVE, _T.VANISHED): _Go(_P.CONNECTING_THEN_FORGET),
    **_rows(_P.CONNECTING_THEN_FORGET, (*_FE_ALL, _T.REMOVE, _T.VANISHED), STAY),
    **_rows(_P.CONNECTING_THEN_STOP, (*_FE_ALL, _T.REMOVE), STAY),
    (_P.CONNECTING_THEN_STOP, _T.VANISHED): _Go(_P.CONNECTING_THEN_FORGET),
    **{
        (phase, t): _Go(after, (_D.TEARDOWN,), failure=t is _T.CONNECT_FAILED)
        for phase, after in _CONNECTING_THEN.items()
        for t in (_T.CONNECT_OK, _T.CONNECT_FAILED)
    },
    **_rows(_P.CONNECTING_THEN_REOFFER, (_T.CONNECT_OK, _T.CONNECT_FAILED), _Rule.RESET),
    # CONNECTED.
    **_rows(_P.CONNECTED, (_T.FE_PUBLISHED, _T.FE_CONNECTED, _T.FE_BUSY), STAY),
    **_rows(_P.CONNECTED, _FE_RESET, _Rule.RESET),
    (_P.CONNECTED, _T.REMOVE): _Go(_P.TEARDOWN_REMOVE, (_D.TEARDOWN,)),
    (_P.CONNECTED, _T.VANISHED): _Go(_P.TEARDOWN_FORGET, (_D.TEARDOWN,)),
    (_P.CONNECTED, _T.VIOLATION): _Go(_P.TEARDOWN_BACKOFF, (_D.TEARDOWN,), failure=True),
    # TEARDOWN_*: removal and vanishing upgrade the destination; the rest waits.
    **{(phase, t): STAY for phase in _TEARDOWNS for t in _FE_ALL},
    (_P.TEARDOWN_REOFFER, _T.REMOVE): _Go(_P.TEARDOWN_REMOVE),
    (_P.TEARDOWN_BACKOFF, _T.REMOVE): _Go(_P.TEARDOWN_REMOVE),
    (_P.TEARDOWN_REMOVE, _T.REMOVE): STAY,
    (_P.TEARDOWN_FORGET, _T.REMOVE): STAY,
    (_P.TEARDOWN_STOP, _T.REMOVE): STAY,
    **{(phase, _T.VANISHED): _Go(_P.TEARDOWN_FORGET) for phase in _TEARDOWNS},
    (_P.TEARDOWN_FORGET, _T.VANISHED): STAY,
    **{(phase, _T.TEARDOWN_DONE): go for phase, go in _TEARDOWNS.items()},
    (_P.TEARDOWN_REOFFER, _T.TEARDOWN_DONE): _Rule.TORN_DOWN,
    (_P.TEARDOWN_BACKOFF, _T.TEARDOWN_DONE): _Rule.TORN_DOWN,
    # CLOSING_HOLD: the frontend closing under us got our Closing; see _Rule.HOLD.
    **_rows(_P.CLOSING_HOLD, _FE_ALL, _Rule.HOLD),
    (_P.CLOSING_HOLD, _T.REMOVE): _Go(_P.REMOVED, (_D.WRITE_CLOSED,)),
    (_P.CLOSING_HOLD, _T.VANISHED): _Go(_P.GONE, (_D.FORGET,)),
    # CLOSED: offer InitWait again once the frontend has reset and the back-off has passed.
    **_rows(_P.CLOSED, (_T.FE_INITIALISING, _T.FE_PUBLISHED, _T.FE_CLOSED), _Rule.OFFER),
    **_rows(_P.CLOSED, (_T.FE_CONNECTED, _T.FE_BUSY), STAY),
    (_P.CLOSED, _T.REMOVE): _Go(_P.REMOVED, (_D.WRITE_CLOSED,)),
    (_P.CLOSED, _T.VANISHED): _Go(_P.GONE, (_D.FORGET,)),
    # REMOVED and GONE only wait.
    **_rows(_P.REMOVED, (*_FE_ALL, _T.REMOVE), STAY),
    (_P.REMOVED, _T.VANISHED): _Go(_P.GONE, (_D.FORGET,)),
    **_rows(_P.GONE, (*_FE_ALL, _T.REMOVE, _T.VANISHED), STAY),
    # SHUTDOWN: whatever is held is released, the guest told Closed, the device forgotten.
    **{
        (phase, _T.SHUTDOWN): _Go(_P.GONE, (_D.WRITE_CLOSED, _D.FORGET))
        for phase in (_P.NEW, _P.INIT_WAIT, _P.CLOSED, _P.CLOSING_HOLD)
    },
    **{
        (phase, _T.SHUTDOWN): _Go(_P.CONNECTING_THEN_STOP)
        for phase in (_P.CONNECTING, _P.CONNECTING_THEN_REOFFER, _P.CONNECTING_THEN_REMOVE)
    },
    (_P.CONNECTED, _T.SHUTDOWN): _Go(_P.TEARDOWN_STOP, (_D.TEARDOWN,)),
    **{
        (phase, _T.SHUTDOWN): _Go(_P.TEARDOWN_STOP)
        for phase in (_P.TEARDOWN_REOFFER, _P.TEARDOWN_BACKOFF, _P.TEARDOWN_REMOVE)
    },
    (_P.REMOVED, _T.SHUTDOWN): _Go(_P.GONE, (_D.FORGET,)),  # Closed is written already
    **_rows(_P.GONE, (_T.SHUTDOWN,), STAY),
    **{
        (phase, _T.SHUTDOWN): STAY
        for phase in (_P.CONNECTING_THEN_FORGET, _P.CONNECTING_THEN_STOP)
        + (_P.TEARDOWN_FORGET, _P.TEARDOWN_STOP)
    },
}
# Local results outside the phases that expect them are misuse; a violation report outside
# CONNECTED is a late report about rings already torn down (or not yet live): nothing to do.
for _phase in Phase:
    for _t in (_T.CONNECT_OK, _T.CONNECT_FAILED, _T.TEARDOWN_DONE):
        _TABLE.setdefault((_phase, _t), MISUSE)
    _TABLE.setdefault((_phase, _T.VIOLATION), STAY)

_TEARDOWN_REASONS: Final = {
    _T.VANISHED: "device directories vanished",
    _T.REMOVE: "toolstack removes the device",
    _T.FE_INITIALISING: "frontend restarted (state 1)",
    _T.FE_CLOSED: "frontend closed",
}


# --- the machine ----------------------------------------------------------------------------


#: How long our Closing stays up for a frontend that is closing (see ``_Rule.HOLD``).
CLOSING_HOLD_S: Final = 0.25


@dataclass(slots=True)
class _Facts:
    observed: bool = False
    stale: bool = False
    frontend: XenbusState = XenbusState.UNKNOWN
    removal: bool = False
    vanished: bool = False


@dataclass(slots=True)
class Handshake:
    """The handshake state machine of one device; see the module docstring."""

    retry: RetryPolicy = field(default_factory=RetryPolicy)
    #: The frontend goes Connected before we do (vkbd); see the module docstring.
    frontend_connects_first: bool = False
    phase: Phase = field(default=Phase.NEW, init=False)
    #: The backend state we last wrote (None before our first write).
    written: XenbusState | None = field(default=None, init=False)
    _facts: _Facts = field(default_factory=_Facts, init=False)
    _now: float = field(default=-math.inf, init=False)
    _failures: int = field(default=0, init=False)
    _retry_at: float = field(default=-math.inf, init=False)
    _connected_at: float | None = field(default=None, init=False)
    _deferred_reason: str = field(default="", init=False)
    _hold_until: float = field(default=-math.inf, init=False)
    _after_hold: Phase = field(default=Phase.INIT_WAIT, init=False)

    @property
    def finished(self) -> bool:
        """True once :class:`Forget` has been emitted."""
        return self.phase is Phase.GONE

    def handle(self, event: Input, now: float) -> list[Action]:
        """Feed one input at time ``now``; return the actions to carry out, in order."""
        self._now = max(self._now, now)
        actions: list[Action] = []
        match event:
            case Observed():
                if self._facts.vanished:
                    return []  # the directories are gone; their contents mean nothing now
                self._observe(event)
                self._settle(actions)
                self._reassert(event, actions)
            case Vanished():
                self._facts.vanished = True
                self._settle(actions)
            case Tick():
                self._settle(actions)
            case ConnectSucceeded():
                self._fire(_T.CONNECT_OK, "", actions)
            case ConnectFailed(reason=reason):
                self._fire(_T.CONNECT_FAILED, f"connect failed: {reason}", actions)
            case ProtocolViolation(reason=reason):
                self._fire(_T.VIOLATION, f"protocol violation: {reason}", actions)
            case TeardownDone():
                self._fire(_T.TEARDOWN_DONE, "", actions)
            case Shutdown():
                self._fire(_T.SHUTDOWN, "daemon stopping", actions)
        return actions

    # -- internals --------------------------------------------------------------------------

    def _observe(self, event: Observed) -> None:
        facts = self._facts
        if not facts.observed:
            facts.observed = True
            facts.stale = event.backend is not XenbusState.INITIALISING
        facts.frontend = event.frontend
        # libxl writes ``online`` = 0 with its Closing. A Closing alone is the toolstack's only
        # once we have written something else: at discovery it is a stale one of ours (a
        # daemon that died holding Closing), and while we hold Closing it is ours.
        toolstack_closing = event.backend is XenbusState.CLOSING and self.written not in (
            None,
            XenbusState.CLOSING,
        )
        if not event.online or toolstack_closing:
            facts.removal = True

    def _level(self) -> _Trigger | None:
        facts = self._facts
        if facts.vanished:
            return _T.VANISHED
        if not facts.observed:
            return None
        if facts.removal:
            return _T.REMOVE
        return _FE_CLASS[facts.frontend]

    def _rule(self, trigger: _Trigger) -> _Go | _Rule:
        if (
            self.frontend_connects_first
            and self.phase is _P.INIT_WAIT
            and trigger is _T.FE_CONNECTED
        ):
            return _TABLE[(_P.INIT_WAIT, _T.FE_PUBLISHED)]
        return _TABLE[(self.phase, trigger)]

    def _fire(self, trigger: _Trigger, reason: str, actions: list[Action]) -> None:
        rule = self._rule(trigger)
        if rule is MISUSE:
            raise HandshakeUsageError(f"{trigger.value} in phase {self.phase.value}")
        self._apply(rule, reason, actions)
        self._settle(actions)

    def _settle(self, actions: list[Action]) -> None:
        for _ in range(len(Phase)):
            trigger = self._level()
            if trigger is None:
                return
            before = self.phase
            self._apply(self._rule(trigger), _TEARDOWN_REASONS.get(trigger, ""), actions)
            if self.phase is before:
                return
        raise AssertionError("handshake table does not settle")  # pragma: no cover

    def _apply(self, rule: _Go | _Rule, reason: str, actions: list[Action]) -> None:
        if rule is STAY:
            return
        if rule is _Rule.BEGIN:
            if self._facts.stale:
                rule = _Go(_P.CLOSED, (_D.WRITE_CLOSED,))
            else:
                rule = _Go(_P.INIT_WAIT, (_D.WRITE_INIT_WAIT,))
        elif rule is _Rule.OFFER:
            if self._now < self._retry_at:
                actions.append(WakeAt(self._retry_at))
                return
            rule = _Go(_P.INIT_WAIT, (_D.WRITE_INIT_WAIT,))
        elif rule is _Rule.RESET:
            rule = self._reset_rule()
        elif rule is _Rule.TORN_DOWN:
            go = _TEARDOWNS[self.phase]
            if self.written is not XenbusState.CLOSING:
                rule = go
            else:
                self._after_hold = go.target
                rule = _Go(_P.CLOSING_HOLD)
        elif rule is _Rule.HOLD:
            if self._facts.frontend is XenbusState.CLOSING and self._now < self._hold_until:
                actions.append(WakeAt(self._hold_until))
                return
            rule = _TEARDOWNS[
                _P.TEARDOWN_REOFFER if self._after_hold is _P.INIT_WAIT else _P.TEARDOWN_BACKOFF
            ]
        assert isinstance(rule, _Go)
        if self.phase is _P.CONNECTED and rule.target is not _P.CONNECTED:
            self._left_connected()
        if rule.failure:
            self._failures += 1
            if not rule.free:
                self._retry_at = self._now + self.retry.delay(self._failures)
        if rule.target is _P.CONNECTED:
            self._connected_at = self._now
        if rule.target in _CONNECTING_THEN_ANY and reason:
            self._deferred_reason = reason  # for the Teardown once the connect result is in
        self.phase = rule.target
        for do in rule.actions:
            actions.append(self._action(do, reason))

    def _reset_rule(self) -> _Go:
        """The guest dropped a connection (or one being made): what it costs it.

        A connection that was stable costs nothing. A short-lived one counts towards the
        back-off like a failure; the first in a row is still reoffered at once (Linux's
        driver removal polls 1 s for our InitWait), every further one waits the back-off, so
        a guest resetting after every connect makes us map and unmap ever more slowly.
        """
        stable = (
            self.phase is _P.CONNECTED
            and self._connected_at is not None
            and self._now - self._connected_at >= self.retry.stable_after
        )
        # A frontend closing (5) under us is answered with Closing first: Linux's shutdown
        # path waits (5 s) for exactly that, reading our state when its watch fires.
        closing = self.phase is _P.CONNECTED and self._facts.frontend is XenbusState.CLOSING
        actions = (_D.WRITE_CLOSING, _D.TEARDOWN) if closing else (_D.TEARDOWN,)
        if closing:
            self._hold_until = self._now + CLOSING_HOLD_S
        if stable:
            return _Go(_P.TEARDOWN_REOFFER, actions)
        if self._failures == 0:
            return _Go(_P.TEARDOWN_REOFFER, actions, failure=True, free=True)
        return _Go(_P.TEARDOWN_BACKOFF, actions, failure=True)

    def _left_connected(self) -> None:
        if self._connected_at is not None and (
            self._now - self._connected_at >= self.retry.stable_after
        ):
            self._failures = 0
        self._connected_at = None

    def _action(self, do: _Do, reason: str) -> Action:
        if do is _D.WRITE_INIT_WAIT:
            return self._write(XenbusState.INIT_WAIT)
        if do is _D.WRITE_CONNECTED:
            return self._write(XenbusState.CONNECTED)
        if do is _D.WRITE_CLOSED:
            return self._write(XenbusState.CLOSED)
        if do is _D.WRITE_CLOSING:
            return self._write(XenbusState.CLOSING)
        if do is _D.CONNECT:
            return Connect()
        if do is _D.TEARDOWN:
            return Teardown(reason or self._deferred_reason or "teardown")
        return Forget()

    def _write(self, state: XenbusState) -> WriteState:
        self.written = state
        return WriteState(state)

    def _reassert(self, event: Observed, actions: list[Action]) -> None:
        if (
            self.written is not None
            and not self._facts.vanished
            and event.backend != self.written
            and event.backend is not XenbusState.CLOSING
            and not any(isinstance(a, WriteState) for a in actions)
        ):
            actions.append(WriteState(self.written))
