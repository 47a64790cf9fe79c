"""The shared request ring (Xen "sring") from both sides, plus the memory barriers it needs.

One module holds the backend view (:class:`BackRing`, used by the daemon), the frontend view
(:class:`FrontRing`, used by the simulated guest and the tests) and the memory fences shared
with the event page, so the index rules of reference §3.1 are written down exactly once.
Both classes work over any writable 4096-byte buffer (``bytearray``, ``memoryview``, ``mmap``)
and do no I/O: the caller maps the page, notifies event channels and decides what a
:class:`~displback.protocol.errors.ProtocolError` costs (here: always closing the device).

Theory of operation
-------------------
The page starts with four free-running u32 indexes — ``req_prod`` (frontend), ``req_event``
(backend), ``rsp_prod`` (backend), ``rsp_event`` (frontend) — followed by 32 slots of 64 bytes;
index ``n`` lives in slot ``n & 31`` at byte offset ``64 + 64 * (n & 31)``. Every index is read
or written as one aligned 32-bit access through a ``memoryview.cast("I")`` element (never
bytewise, so the peer can never observe a torn value), and every difference of indexes is
taken modulo 2**32.

Each side keeps its own cursors privately and only publishes them; nothing it reads back from
the page is trusted. The backend validates ``req_prod`` against its private ``rsp_prod_pvt``
(producer overflow: more than 32 requests unanswered) and against ``req_cons`` (consumer
overflow: ``req_prod`` moved backwards), copies each request slot exactly once into private
``bytes`` and processes only the copies. A slot is reused for the response to a request, so a
response may only be written for a request already copied out: :meth:`BackRing.put_response`
refuses to let ``rsp_prod_pvt`` pass ``req_cons``.

Notifications follow Xen's hold-off rule: after publishing a producer index the producer
notifies iff the consumer's ``*_event`` lies in the range just published; a consumer about to
sleep runs the final check (write ``*_event = cons + 1``, full barrier, re-read the producer
index). If both sides follow that protocol no wake-up is lost.

Memory ordering (reference §3.4)
--------------------------------
CPython's buffer accesses are plain C loads and stores with no fences, and each one is a
separate opaque C call, so the compiler cannot reorder them; only the CPU can. The ring needs
three kinds of barrier:

* a **read barrier** after loading a producer index, before reading the slots it covers;
* a **write barrier** after writing slots, before publishing the producer index that covers
  them (and, for the event page, after reading slots before releasing them);
* a **full barrier** between a store and a following load of a *different* index: publish
  ``rsp_prod`` → read ``rsp_event``; publish ``req_prod`` → read ``req_event``; write
  ``req_event``/``rsp_event`` → re-read the producer index in the final check. Without it a
  store can sit in the store buffer while the load is satisfied, both sides decide the other
  will look, and a wake-up is lost (the Linux guest turns that into a 3-second timeout).

On x86-64 (TSO) loads are not reordered with loads, stores not with stores, and loads not with
later stores, so the read and write barriers are implicit and only the store→load pairs need
a real fence. arm64 reorders all four combinations, so every site needs a real barrier there.
Each class therefore takes two swappable callables: ``fence`` is called exactly at the
full-barrier (store→load) sites, ``rw_fence`` at the read/write-barrier sites. By default
``fence`` is :func:`full_fence` and ``rw_fence`` is a no-op on x86 and :func:`full_fence`
elsewhere (stronger than needed on arm64, but simple and correct).

:func:`full_fence` calls ``atomic_thread_fence(memory_order_seq_cst)`` from the system's
``libatomic.so.1`` through ``ctypes`` (``lock or [rsp], 0`` on x86-64, ``dmb ish`` on arm64;
about 0.2 µs a call). It was chosen over the alternatives because they are not guaranteed
barriers against a peer in *another domain*: a plain syscall's entry/exit is not a barrier (the
kernel's own membarrier code says so), and ``membarrier(2)`` returns early without any barrier
when the domain has one online vCPU (every command; a common Dom0 configuration) or, for
``PRIVATE_EXPEDITED``, when the caller is single-threaded — the kernel only orders against its
own CPUs and threads, never against another domain. If ``libatomic.so.1`` (Debian package
``libatomic1``) is missing, building a ring with the default fence raises
:class:`FenceUnavailableError`; pass your own ``fence=`` instead.
"""

from __future__ import annotations

import ctypes
import mmap
import platform
from collections.abc import Callable

from displback.protocol.constants import (
    PACKET_SIZE,
    PAGE_SIZE,
    RING_HEADER_SIZE,
    RING_REQ_EVENT_OFS,
    RING_REQ_PROD_OFS,
    RING_RSP_EVENT_OFS,
    RING_RSP_PROD_OFS,
    RING_SIZE,
)
from displback.protocol.errors import ProtocolError

__all__ = [
    "BackRing",
    "Fence",
    "FenceUnavailableError",
    "FrontRing",
    "INDEX_MASK",
    "Page",
    "SharedPage",
    "default_rw_fence",
    "full_fence",
    "init_shared",
    "slot_offset",
]

Fence = Callable[[], None]
Page = bytearray | memoryview | mmap.mmap

INDEX_MASK = 0xFFFF_FFFF
_SEQ_CST = 5  # __ATOMIC_SEQ_CST / memory_order_seq_cst
_TSO_MACHINES = frozenset({"x86_64", "amd64", "i386", "i486", "i586", "i686", "x86"})
_LIBATOMIC = "libatomic.so.1"


class FenceUnavailableError(RuntimeError):
    """No full memory barrier could be loaded; install ``libatomic1`` or pass ``fence=``."""


_full_fence_impl: Fence | None = None


def _resolve_full_fence() -> Fence:
    """Load ``atomic_thread_fence`` from libatomic once; raise if the library is missing."""
    global _full_fence_impl
    if _full_fence_impl is None:
        try:
            # PyDLL: called with the GIL held, which is cheaper and harmless for a fence.
            lib = ctypes.PyDLL(_LIBATOMIC)
            func = lib.atomic_thread_fence
        except (OSError, AttributeError) as exc:
            raise FenceUnavailableError(
                f"cannot load atomic_thread_fence from {_LIBATOMIC} ({exc}); install the "
                "libatomic1 package or pass an explicit fence= to the ring"
            ) from exc
        func.argtypes = [ctypes.c_int]
        func.restype = None

        def fence() -> None:
            func(_SEQ_CST)

        _full_fence_impl = fence
    return _full_fence_impl


def full_fence() -> None:
    """Execute a full CPU memory barrier (store→load ordering included)."""
    _resolve_full_fence()()


def _no_fence() -> None:
    """Read/write barrier on a TSO machine: the hardware already keeps that order."""


def default_rw_fence() -> Fence:
    """The read/write barrier for this machine: implicit on x86 (TSO), a full fence elsewhere."""
    if platform.machine().lower() in _TSO_MACHINES:
        return _no_fence
    return _resolve_full_fence()


_REQ_PROD_WORD = RING_REQ_PROD_OFS >> 2


def slot_offset(index: int) -> int:
    """Byte offset of the request-ring slot holding free-running index ``index``."""
    return RING_HEADER_SIZE + PACKET_SIZE * (index & (RING_SIZE - 1))


def _check_index(name: str, value: int) -> int:
    if not 0 <= value <= INDEX_MASK:
        raise ValueError(f"{name} must be a u32, got {value!r}")
    return value


class SharedPage:
    """A writable 4096-byte page seen as bytes and as aligned native u32 words.

    The base of both ring sides and of the event page: index loads/stores are single 32-bit
    element accesses of a ``cast("I")`` view; packets are copied in and out as 64-byte slices.
    The views export the buffer, so call :meth:`release` before closing or unmapping an
    ``mmap`` page.
    """

    def __init__(self, page: Page) -> None:
        raw = memoryview(page)
        if raw.readonly:
            raise ValueError("the shared page must be writable")
        raw = raw.cast("B")
        if raw.nbytes != PAGE_SIZE:
            raw.release()
            raise ValueError(f"the shared page must be {PAGE_SIZE} bytes, got {raw.nbytes}")
        words = raw.cast("I")
        if words.itemsize != 4:  # pragma: no cover - every supported platform has 32-bit int
            raise ValueError("native unsigned int is not 32 bits on this platform")
        self._bytes = raw
        self._words = words

    def _load(self, offset: int) -> int:
        """One aligned 32-bit load of the index at byte ``offset``."""
        value: int = self._words[offset >> 2]
        return value

    def _store(self, offset: int, value: int) -> None:
        """One aligned 32-bit store of ``value`` (reduced mod 2**32) at byte ``offset``."""
        self._words[offset >> 2] = value & INDEX_MASK

    def _copy_out(self, offset: int) -> bytes:
        """Copy the 64-byte packet at ``offset`` into private memory, once."""
        return bytes(self._bytes[offset : offset + PACKET_SIZE])

    def _copy_in(self, offset: int, packet: bytes) -> None:
        if len(packet) != PACKET_SIZE:
            raise ValueError(f"a packet is {PACKET_SIZE} bytes, got {len(packet)}")
        self._bytes[offset : offset + PACKET_SIZE] = packet

    def release(self) -> None:
        """Drop the views of the page (needed before ``mmap.close()``); the object is dead."""
        self._words.release()
        self._bytes.release()


def init_shared(page: Page, *, start: int = 0) -> None:
    """Initialise a request-ring page as the frontend's ``SHARED_RING_INIT`` does.

    Zeroes the 64-byte header (private pad and padding included), then sets
    ``req_prod = rsp_prod = start`` and ``req_event = rsp_event = start + 1``. ``start`` is 0
    at every real connect; other values let tests begin next to the 2**32 wrap.
    """
    _check_index("start", start)
    shared = SharedPage(page)
    try:
        shared._bytes[:RING_HEADER_SIZE] = bytes(RING_HEADER_SIZE)
        shared._store(RING_REQ_PROD_OFS, start)
        shared._store(RING_RSP_PROD_OFS, start)
        shared._store(RING_REQ_EVENT_OFS, start + 1)
        shared._store(RING_RSP_EVENT_OFS, start + 1)
    finally:
        shared.release()


class _RingSide(SharedPage):
    """What both ring sides share: barriers, slot access, the notify and final-check rules."""

    def __init__(self, page: Page, *, fence: Fence | None, rw_fence: Fence | None) -> None:
        self._fence = fence if fence is not None else _resolve_full_fence()
        self._rw_fence = rw_fence if rw_fence is not None else default_rw_fence()
        super().__init__(page)

    def _publish(self, prod_ofs: int, event_ofs: int, new: int, old: int) -> bool:
        """Publish producer index ``new`` (was ``old``); return whether the peer wants a kick.

        The peer asked to be notified when the index passes its ``*_event``: notify iff
        ``*_event`` lies in ``(old, new]``, i.e. ``(new - event) < (new - old)`` mod 2**32.
        """
        self._rw_fence()  # write barrier: slots are visible before the index covering them
        self._store(prod_ofs, new)
        self._fence()  # full barrier: publish the index *before* reading the peer's *_event
        event = self._load(event_ofs)
        return (new - event) & INDEX_MASK < (new - old) & INDEX_MASK

    def _final_check(self, event_ofs: int, cons: int, unconsumed: Callable[[], int]) -> bool:
        """``RING_FINAL_CHECK_FOR_*``: True if work is pending; otherwise arm ``*_event``.

        When nothing is left, ask to be notified for the very next message by writing
        ``*_event = cons + 1``, then re-read the producer index in case a message was
        published before the peer could see the new ``*_event``.
        """
        if unconsumed():
            return True
        self._store(event_ofs, cons + 1)
        self._fence()  # full barrier: *_event must be visible before re-reading the producer
        return unconsumed() > 0


class BackRing(_RingSide):
    """The backend's view of a request ring: consume requests, produce responses.

    Typical use, each time the request event channel fires and once at connect::

        while True:
            for packet in ring.take_requests():   # private copies, may raise ProtocolError
                ring.put_response(handle(packet))  # or later, but one per request
            if ring.push_responses():
                notify()
            if not ring.final_check():
                break

    Any :class:`ProtocolError` (``errno`` None) means the frontend is broken or hostile: stop
    using the ring and close the device.
    """

    def __init__(
        self,
        page: Page,
        *,
        start: int = 0,
        fence: Fence | None = None,
        rw_fence: Fence | None = None,
    ) -> None:
        super().__init__(page, fence=fence, rw_fence=rw_fence)
        self._req_cons = _check_index("start", start)
        self._rsp_prod_pvt = start
        self._rsp_prod_published = start
        self.requests_taken = 0
        self.responses_pushed = 0

    @property
    def req_cons(self) -> int:
        """Next request index to copy out (private)."""
        return self._req_cons

    @property
    def rsp_prod_pvt(self) -> int:
        """Next response index to write (private; published by :meth:`push_responses`)."""
        return self._rsp_prod_pvt

    @property
    def unanswered(self) -> int:
        """Requests copied out that have no response written yet."""
        return (self._req_cons - self._rsp_prod_pvt) & INDEX_MASK

    @property
    def pending_responses(self) -> int:
        """Responses written into slots but not yet published in ``rsp_prod``."""
        return (self._rsp_prod_pvt - self._rsp_prod_published) & INDEX_MASK

    def _unconsumed(self) -> int:
        """``RING_HAS_UNCONSUMED_REQUESTS``: new requests, capped by the free response slots."""
        cons = self._req_cons
        req = (self._words[_REQ_PROD_WORD] - cons) & INDEX_MASK
        rsp = RING_SIZE - ((cons - self._rsp_prod_pvt) & INDEX_MASK)
        return req if req < rsp else rsp

    def take_requests(self) -> list[bytes]:
        """Copy every newly produced request out of the ring, each slot exactly once.

        Reads ``req_prod`` once. Raises :class:`ProtocolError` (nothing consumed) if it claims
        more than 32 requests without responses (producer overflow) or lies behind
        ``req_cons`` (consumer overflow: the loop would run past the slots we may read).
        """
        req_prod: int = self._words[_REQ_PROD_WORD]
        self._rw_fence()  # read barrier: see the slots at least as new as req_prod
        if (req_prod - self._rsp_prod_pvt) & INDEX_MASK > RING_SIZE:
            raise ProtocolError(
                f"req_prod {req_prod} is more than {RING_SIZE} requests ahead of the "
                f"responses produced ({self._rsp_prod_pvt}): producer overflow",
                what="req_prod",
                value=req_prod,
            )
        count = (req_prod - self._req_cons) & INDEX_MASK
        if count > RING_SIZE - self.unanswered:
            raise ProtocolError(
                f"req_prod {req_prod} lies behind req_cons {self._req_cons}: consumer overflow",
                what="req_prod",
                value=req_prod,
            )
        cons = self._req_cons
        if count == 0:
            return []
        page = self._bytes
        packets = []
        for index in range(cons, cons + count):
            offset = RING_HEADER_SIZE + PACKET_SIZE * (index & (RING_SIZE - 1))
            packets.append(bytes(page[offset : offset + PACKET_SIZE]))
        self._req_cons = (cons + count) & INDEX_MASK
        self.requests_taken += count
        return packets

    def final_check(self) -> bool:
        """Before sleeping: True if requests are pending (take them), else arm ``req_event``.

        Never raises; a hostile ``req_prod`` makes it return True so that the next
        :meth:`take_requests` reports the violation — unless all 32 slots hold requests
        awaiting responses, in which case there is nothing to read until we answer.
        """
        # _RingSide._final_check, written out: it runs twice per request.
        if self._unconsumed():
            return True
        self._store(RING_REQ_EVENT_OFS, self._req_cons + 1)
        self._fence()  # full barrier: req_event must be visible before re-reading req_prod
        return self._unconsumed() > 0

    def put_response(self, packet: bytes) -> None:
        """Write a 64-byte response into slot ``rsp_prod_pvt & 31`` (not yet published).

        Raises :class:`RuntimeError` — a bug in the caller, not the guest — if every request
        taken already has its response: the slot may still hold a request not copied out.
        """
        prod = self._rsp_prod_pvt
        if prod == self._req_cons:
            raise RuntimeError(
                "put_response without an unanswered request: rsp_prod_pvt would pass req_cons"
            )
        self._copy_in(slot_offset(prod), packet)
        self._rsp_prod_pvt = (prod + 1) & INDEX_MASK

    def push_responses(self) -> bool:
        """Publish ``rsp_prod``; return True if the frontend must be notified (``rsp_event``).

        The previous value is our own private copy, not the page's (which the guest could
        have scribbled on).
        """
        old, new = self._rsp_prod_published, self._rsp_prod_pvt
        notify = self._publish(RING_RSP_PROD_OFS, RING_RSP_EVENT_OFS, new, old)
        self.responses_pushed += (new - old) & INDEX_MASK
        self._rsp_prod_published = new
        return notify


class FrontRing(_RingSide):
    """The frontend's view of a request ring (simulated guest, tests): requests out, responses in.

    Creating it initialises the shared page like ``SHARED_RING_INIT``. Responses are checked
    against the requests published so far; a backend claiming more is a :class:`ProtocolError`.
    """

    def __init__(
        self,
        page: Page,
        *,
        start: int = 0,
        fence: Fence | None = None,
        rw_fence: Fence | None = None,
    ) -> None:
        super().__init__(page, fence=fence, rw_fence=rw_fence)
        init_shared(self._bytes, start=start)
        self._req_prod_pvt = start
        self._req_prod_published = start
        self._rsp_cons = start

    @property
    def req_prod_pvt(self) -> int:
        """Next request index to write (private; published by :meth:`push_requests`)."""
        return self._req_prod_pvt

    @property
    def rsp_cons(self) -> int:
        """Next response index to copy out (private)."""
        return self._rsp_cons

    @property
    def outstanding(self) -> int:
        """Requests written whose responses have not been taken yet."""
        return (self._req_prod_pvt - self._rsp_cons) & INDEX_MASK

    def put_request(self, packet: bytes) -> None:
        """Write a 64-byte request into the next slot; RuntimeError if 32 are outstanding."""
        if self.outstanding >= RING_SIZE:
            raise RuntimeError(f"request ring full: {RING_SIZE} requests outstanding")
        self._copy_in(slot_offset(self._req_prod_pvt), packet)
        self._req_prod_pvt = (self._req_prod_pvt + 1) & INDEX_MASK

    def push_requests(self) -> bool:
        """Publish ``req_prod``; return True if the backend must be notified (``req_event``)."""
        old, new = self._req_prod_published, self._req_prod_pvt
        notify = self._publish(RING_REQ_PROD_OFS, RING_REQ_EVENT_OFS, new, old)
        self._req_prod_published = new
        return notify

    def _unconsumed(self) -> int:
        return (self._load(RING_RSP_PROD_OFS) - self._rsp_cons) & INDEX_MASK

    def take_responses(self) -> list[bytes]:
        """Copy every newly published response out; ProtocolError if more than requested."""
        rsp_prod = self._load(RING_RSP_PROD_OFS)
        self._rw_fence()  # read barrier: see the slots at least as new as rsp_prod
        count = (rsp_prod - self._rsp_cons) & INDEX_MASK
        if count > (self._req_prod_published - self._rsp_cons) & INDEX_MASK:
            raise ProtocolError(
                f"rsp_prod {rsp_prod} claims more responses than requests published "
                f"({self._req_prod_published})",
                what="rsp_prod",
                value=rsp_prod,
            )
        cons = self._rsp_cons
        packets = [self._copy_out(slot_offset(cons + i)) for i in range(count)]
        self._rsp_cons = (cons + count) & INDEX_MASK
        return packets

    def final_check_for_responses(self) -> bool:
        """Before sleeping: True if responses are pending, else arm ``rsp_event``."""
        return self._final_check(RING_RSP_EVENT_OFS, self._rsp_cons, self._unconsumed)
