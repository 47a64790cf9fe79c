"""The flip queue of one connector: accepted PG_FLIPs, SET_CONFIG barriers and the EVT_PG_FLIP
events they owe the guest, as a state object with no I/O (as h11's ``Connection``).

The backend's connector (:mod:`displback.backend.connector`) feeds it what happens — a
PG_FLIP accepted, a SET_CONFIG to apply, a frame that landed, a retry — and does what it
answers: start this frame or this configuration on the output, notify the event channel. It
never waits, reads no clock (times are passed in) and knows no display type: framebuffers and
configurations are opaque values. The simulated guest's test backend uses it as well.

Theory of operation
-------------------
**Commands.** Accepted flips and configurations wait in one FIFO, so a SET_CONFIG is applied
after the flips the guest sent before it and before those it sends after. One command is *in
flight* at a time (an output takes one flip or modeset at a time: KMS answers ``EBUSY``
otherwise): :meth:`FlipQueue.next_command` hands out the next one, or None while one is in
flight, until the caller reports it done with :meth:`FlipQueue.frame_done` or
:meth:`FlipQueue.config_done`.

**Coalescing.** When :meth:`~FlipQueue.next_command` meets a flip, it takes every flip queued
right behind it too (up to the next configuration): only the newest framebuffer is shown — a
:class:`Frame` — and the older ones are *coalesced*. Each flip of the frame still owes the
guest exactly one event, sent when the frame lands: the Linux frontend numbers events and
waits 3.1 s for each flip's.

**Events.** A landed frame's events are queued in acceptance order and written to the event
page through an :class:`EventSink` (the backend's
:class:`~displback.protocol.evtpage.EventProducer`, which numbers them 0, 1, 2 … and never
overwrites an unread slot). What does not fit stays queued: the guest never tells us when it
consumed, so the caller retries (:meth:`FlipQueue.publish`) while :attr:`FlipQueue.
queued_events` is not 0, and notifies the event channel whenever a call reports events sent.

**Drop bound.** At most ``max_queued_events`` events wait for room; the events of further
frames are dropped (counted in ``events_dropped``). Only a guest that stopped reading its page
gets there; without the bound its flips would grow Dom0's memory forever.

**Late events.** An event written more than ``late_after`` seconds after its flip was
accepted is counted in ``events_late``: the Linux guest has already timed out on it.

A :class:`~displback.protocol.errors.ProtocolError` from the sink (an impossible ``in_cons``)
discards every queued event and propagates: the device is closed.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Generic, NamedTuple, Protocol, TypeVar

from displback.protocol.errors import ProtocolError

__all__ = [
    "MAX_QUEUED_EVENTS",
    "ConfigCommand",
    "EventSink",
    "FlipCounters",
    "FlipQueue",
    "Frame",
    "Published",
    "QueuedFlip",
]

#: Events waiting for room on the event page beyond which new ones are dropped. A Linux guest
#: consumes every event in its interrupt handler and has at most one flip outstanding per
#: connector; only a guest that stopped reading its event page gets here.
MAX_QUEUED_EVENTS = 256

FbT = TypeVar("FbT")
CfgT = TypeVar("CfgT")


class EventSink(Protocol):
    """Where events go: :meth:`~displback.protocol.evtpage.EventProducer.put_pg_flip`."""

    def put_pg_flip(self, fb_cookie: int) -> bool:
        """Write one event; False (nothing written) while the page is full."""
        ...


class QueuedFlip(NamedTuple):
    """One accepted PG_FLIP: its framebuffer cookie and when it was accepted."""

    fb_cookie: int
    accepted: float


@dataclass(frozen=True, slots=True, eq=False)
class Frame(Generic[FbT]):
    """Show ``fb`` (the newest flip); each of ``flips`` gets its event when it lands."""

    fb: FbT
    flips: tuple[QueuedFlip, ...]


@dataclass(frozen=True, slots=True, eq=False)
class ConfigCommand(Generic[CfgT]):
    """Apply ``config`` (a SET_CONFIG) once the flips queued before it are shown."""

    config: CfgT


@dataclass
class FlipCounters:
    """What the queue counts since the connector connected."""

    flips_accepted: int = 0
    flips_coalesced: int = 0
    events_sent: int = 0
    #: Attempts to write an event that found the page full.
    events_delayed: int = 0
    events_dropped: int = 0
    events_late: int = 0


class Published(NamedTuple):
    """What one call wrote: notify the event channel if ``sent``; log if ``dropped``."""

    sent: int
    dropped: int


class _Flip(NamedTuple, Generic[FbT]):
    flip: QueuedFlip
    fb: FbT


class FlipQueue(Generic[FbT, CfgT]):
    """The flips, configurations and events of one connector (see the module docstring)."""

    def __init__(
        self,
        sink: EventSink,
        *,
        max_queued_events: int = MAX_QUEUED_EVENTS,
        late_after: float = float("inf"),
        counters: FlipCounters | None = None,
    ) -> None:
        if max_queued_events < 0:
            raise ValueError(f"max_queued_events must be >= 0, not {max_queued_events}")
        self._sink = sink
        self._max_events = max_queued_events
        #: Seconds after acceptance past which a written event counts as late (may be changed).
        self.late_after = late_after
        self.counters = counters if counters is not None else FlipCounters()
        self._commands: collections.deque[_Flip[FbT] | ConfigCommand[CfgT]] = (
            collections.deque()
        )
        self._in_flight: Frame[FbT] | ConfigCommand[CfgT] | None = None
        self._events: collections.deque[QueuedFlip] = collections.deque()

    # --- state ------------------------------------------------------------------------------

    @property
    def in_flight(self) -> Frame[FbT] | ConfigCommand[CfgT] | None:
        """The command handed out and not yet reported done."""
        return self._in_flight

    @property
    def queued_commands(self) -> int:
        """Flips and configurations accepted and not yet handed out."""
        return len(self._commands)

    @property
    def queued_events(self) -> int:
        """Events of landed frames waiting for room (at most ``max_queued_events``)."""
        return len(self._events)

    # --- inputs -----------------------------------------------------------------------------

    def accept_flip(self, fb_cookie: int, fb: FbT, now: float) -> None:
        """A PG_FLIP to ``fb`` was accepted (and answered) at ``now``."""
        self.counters.flips_accepted += 1
        self._commands.append(_Flip(QueuedFlip(fb_cookie, now), fb))

    def accept_config(self, config: CfgT) -> None:
        """A SET_CONFIG to apply after the flips accepted before it."""
        self._commands.append(ConfigCommand(config))

    def next_command(self) -> Frame[FbT] | ConfigCommand[CfgT] | None:
        """The command to carry out now, which is then in flight; None while one is in flight
        or nothing is queued. Flips queued back to back come out as one :class:`Frame`."""
        if self._in_flight is not None or not self._commands:
            return None
        head = self._commands.popleft()
        if isinstance(head, ConfigCommand):
            self._in_flight = head
            return head
        flips = [head.flip]
        fb = head.fb
        commands = self._commands
        while commands and not isinstance(commands[0], ConfigCommand):
            behind = commands.popleft()
            assert isinstance(behind, _Flip)
            flips.append(behind.flip)
            fb = behind.fb
        self.counters.flips_coalesced += len(flips) - 1
        frame = Frame(fb, tuple(flips))
        self._in_flight = frame
        return frame

    def config_done(self, command: ConfigCommand[CfgT]) -> None:
        """``command`` (in flight) was applied, or failed: the next command may start."""
        self._finish(command)

    def frame_done(self, frame: Frame[FbT], now: float) -> Published:
        """``frame`` (in flight) landed, or was dropped: its flips' events are due now.

        They are queued behind any still waiting (past the bound they are dropped) and as
        many as fit are written at once.
        """
        self._finish(frame)
        room = self._max_events - len(self._events)
        flips = frame.flips
        dropped = max(0, len(flips) - room)
        if dropped:
            flips = flips[: len(flips) - dropped]
            self.counters.events_dropped += dropped
        self._events.extend(flips)
        return Published(self.publish(now), dropped)

    def publish(self, now: float) -> int:
        """Write queued events until the page is full; the number written (notify if > 0)."""
        events = self._events
        sent = late = 0
        try:
            while events:
                flip = events[0]
                if not self._sink.put_pg_flip(flip.fb_cookie):
                    self.counters.events_delayed += 1
                    break
                events.popleft()
                sent += 1
                if now - flip.accepted > self.late_after:
                    late += 1
        except ProtocolError:
            events.clear()
            raise
        finally:
            self.counters.events_sent += sent
            self.counters.events_late += late
        return sent

    # --- internals --------------------------------------------------------------------------

    def _finish(self, command: Frame[FbT] | ConfigCommand[CfgT]) -> None:
        if command is not self._in_flight:
            raise ValueError(f"{command!r} is not the command in flight")
        self._in_flight = None
