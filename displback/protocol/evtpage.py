"""The event page (backend → frontend PG_FLIP events) from both sides, over one shared page.

:class:`EventProducer` is the backend's half: it numbers events per connection and writes
them without ever overwriting a slot the frontend has not consumed. :class:`EventConsumer` is
the frontend's half as the Linux ``xen-drm-front`` driver behaves, for the simulated guest and
the tests. Like the request ring (:mod:`displback.protocol.ring`) both work over any writable
4096-byte buffer and do no I/O; the caller notifies the event-page channel.

Theory of operation (reference §3.2, §6)
----------------------------------------
The page holds ``in_cons`` (offset 0, written by the frontend) and ``in_prod`` (offset 4,
written by the backend), free-running u32 counters starting at 0 in the zeroed page the
frontend allocates, then 63 slots of 64 bytes. Index ``n`` lives at byte
``64 + 64 * (n mod 63)`` with ``n`` the *full* u32 counter; both sides use exactly this
formula, so they always agree on where an index lives. But 2**32 = 4 (mod 63): the slots run
… 61, 62, 0, 1, 2, 3 (indexes 2**32-4 … 2**32-1), then 0, 1, 2 … again, so across the wrap the
indexes 0…3 land on the slots of 2**32-4 … 2**32-1. Writing them while those are unread would
destroy events, so the producer also treats the page as full while the slot it is about to use
still holds an unread event (this can only happen for the four indexes after the wrap).

Producing: read ``in_cons`` (hostile), and if ``(in_prod - in_cons) mod 2**32`` is 63 (or the
target slot is still unread, see above) the page is full and nothing is written — the caller
keeps the event queued and retries later (the frontend never tells us when it consumed). A
distance above 63 cannot come from a correct frontend (it would mean ``in_cons`` passed
``in_prod``, or slots we never wrote were "consumed"): that is a :class:`ProtocolError` with
``errno`` None, and the device should be closed. Otherwise write the event, write barrier,
publish ``in_prod + 1``.

Event ids: the Linux frontend keeps a u16 counter per connection from 0, advances it for every
slot it reads and silently drops an event whose ``id`` differs — it never resynchronises. So
the producer numbers events 0, 1, 2 … wrapping at 65536, and an id is used up only when an
event is actually written: a refused ``put`` leaves no gap.

Barriers (see :mod:`displback.protocol.ring` for the full argument): there is no store→load
pair whose reordering loses anything here — a stale ``in_cons`` only makes the page look
fuller, and the frontend is notified after every event — so only read/write barriers are
needed, which x86-64 provides implicitly. ``rw_fence`` is called after reading the peer's
counter and before publishing our own; it defaults to a no-op on x86 and a real full fence
elsewhere.
"""

from __future__ import annotations

from displback.protocol.constants import (
    EVT_IN_CONS_OFS,
    EVT_IN_PROD_OFS,
    EVT_PAGE_HEADER_SIZE,
    EVT_PAGE_SLOTS,
    PACKET_SIZE,
)
from displback.protocol.errors import ProtocolError
from displback.protocol.messages import PgFlipEvent
from displback.protocol.ring import (
    INDEX_MASK,
    Fence,
    Page,
    SharedPage,
    default_rw_fence,
)

__all__ = ["EVENT_ID_MODULUS", "EventConsumer", "EventProducer", "event_slot_offset"]

EVENT_ID_MODULUS = 0x1_0000  # event ids are u16


def event_slot_offset(index: int) -> int:
    """Byte offset of the event slot for free-running u32 index ``index`` (``n mod 63``)."""
    return EVT_PAGE_HEADER_SIZE + PACKET_SIZE * ((index & INDEX_MASK) % EVT_PAGE_SLOTS)


class EventProducer(SharedPage):
    """The backend's half of the event page: numbered PG_FLIP events, never past ``in_cons``.

    ``start`` is the private ``in_prod`` (0 at every real connect, where the frontend's page
    is zeroed; other values let tests begin next to the 2**32 wrap — the page's ``in_prod``
    and ``in_cons`` must then hold the same value). Event ids always start at 0.
    """

    def __init__(self, page: Page, *, start: int = 0, rw_fence: Fence | None = None) -> None:
        if not 0 <= start <= INDEX_MASK:
            raise ValueError(f"start must be a u32, got {start!r}")
        self._rw_fence = rw_fence if rw_fence is not None else default_rw_fence()
        super().__init__(page)
        self._in_prod = start
        self._next_id = 0

    @property
    def in_prod(self) -> int:
        """Events produced so far (free-running u32; also published on the page)."""
        return self._in_prod

    @property
    def next_id(self) -> int:
        """The ``id`` the next written event will carry (u16)."""
        return self._next_id

    def _slot_still_unread(self, in_cons: int) -> bool:
        """Would the slot for ``in_prod`` overwrite an unread event? Only across the u32 wrap.

        Fewer than 63 consecutive integers have distinct residues mod 63, so a collision needs
        the unread window to straddle 2**32; then only its part before the wrap can share the
        slot of the new index.
        """
        if in_cons <= self._in_prod:
            return False
        target = event_slot_offset(self._in_prod)
        return any(event_slot_offset(index) == target for index in range(in_cons, INDEX_MASK + 1))

    def is_full(self) -> bool:
        """True if :meth:`put_pg_flip` would refuse now (reads the hostile ``in_cons``)."""
        in_cons = self._load(EVT_IN_CONS_OFS)
        self._rw_fence()
        return self._refuses(in_cons)

    def _refuses(self, in_cons: int) -> bool:
        unread = (self._in_prod - in_cons) & INDEX_MASK
        if unread > EVT_PAGE_SLOTS:
            raise ProtocolError(
                f"in_cons {in_cons} is not within {EVT_PAGE_SLOTS} events behind "
                f"in_prod {self._in_prod}",
                what="in_cons",
                value=in_cons,
            )
        return unread == EVT_PAGE_SLOTS or self._slot_still_unread(in_cons)

    def put_pg_flip(self, fb_cookie: int) -> bool:
        """Write the next PG_FLIP event; False (nothing written, no id used) if the page is full.

        On False keep the event queued and retry later: the frontend never signals that it
        consumed events.

        Raises :class:`ProtocolError` if the frontend's ``in_cons`` is impossible (device must
        be closed). After True, the caller notifies the event-page channel.
        """
        in_cons = self._load(EVT_IN_CONS_OFS)  # hostile: read once, validated by _refuses
        self._rw_fence()  # read barrier: the frontend read the slots before it moved in_cons
        if self._refuses(in_cons):
            return False
        event = PgFlipEvent(id=self._next_id, fb_cookie=fb_cookie)
        event.pack_into(self._bytes, event_slot_offset(self._in_prod))
        self._rw_fence()  # write barrier: the event is visible before in_prod covers it
        self._in_prod = (self._in_prod + 1) & INDEX_MASK
        self._store(EVT_IN_PROD_OFS, self._in_prod)
        self._next_id = (self._next_id + 1) % EVENT_ID_MODULUS
        return True


class EventConsumer(SharedPage):
    """The frontend's half, with Linux's id rule: an event whose id is not expected is dropped.

    A u16 counter starts at 0 per connection and advances for every slot read, whether the
    event is accepted or not. Events of an unknown type are dropped the same way. Unlike
    Linux, an ``in_prod`` more than 63 ahead of ``in_cons`` (a backend overwriting unread
    slots) is reported as :class:`ProtocolError` — the simulated guest exists to catch that.
    """

    def __init__(self, page: Page, *, rw_fence: Fence | None = None) -> None:
        self._rw_fence = rw_fence if rw_fence is not None else default_rw_fence()
        super().__init__(page)
        self._expected_id = 0
        self.skipped = 0

    @property
    def expected_id(self) -> int:
        """The id the next event must carry to be accepted (u16)."""
        return self._expected_id

    def take(self) -> list[PgFlipEvent]:
        """Read every slot from ``in_cons`` to ``in_prod``, return the accepted events."""
        in_prod = self._load(EVT_IN_PROD_OFS)
        self._rw_fence()  # read barrier: see the slots at least as new as in_prod
        in_cons = self._load(EVT_IN_CONS_OFS)
        count = (in_prod - in_cons) & INDEX_MASK
        if count > EVT_PAGE_SLOTS:
            raise ProtocolError(
                f"in_prod {in_prod} is more than {EVT_PAGE_SLOTS} events ahead of "
                f"in_cons {in_cons}",
                what="in_prod",
                value=in_prod,
            )
        accepted: list[PgFlipEvent] = []
        for i in range(count):
            raw = self._copy_out(event_slot_offset(in_cons + i))
            expected = self._expected_id
            self._expected_id = (expected + 1) % EVENT_ID_MODULUS
            try:
                event = PgFlipEvent.parse(raw)
            except ProtocolError:  # unknown event type: ignored, like Linux
                self.skipped += 1
                continue
            if event.id != expected:
                self.skipped += 1
                continue
            accepted.append(event)
        self._rw_fence()  # the slots were read before in_cons releases them
        self._store(EVT_IN_CONS_OFS, in_prod)
        return accepted
