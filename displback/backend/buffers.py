"""One guest device's display buffers and framebuffers: DBUF_CREATE/DESTROY, FB_ATTACH/DETACH.

Theory of operation
-------------------
A :class:`BufferStore` holds the buffer and framebuffer tables of one guest device (cookies
are unique per device, reference §4.0) and everything those buffers hold in Dom0. Handlers
raise :class:`RequestError`; a failed request leaves nothing mapped, exported or granted.

A buffer is one of three kinds (:class:`BufferKind`), chosen at DBUF_CREATE:

* ``ZERO_COPY`` — guest-allocated pages exported as a dma-buf (``DMABUF_EXP_FROM_REFS``).
  Each output imports that dma-buf lazily on first use (:meth:`GuestFramebuffer.present_on`)
  and scans the guest's memory out directly.
* ``COPY`` — guest-allocated pages mapped into Dom0 (read-only: we only read them). Used when
  the policy is ``OFF`` or the platform cannot export (``ENOTTY``: a kernel without
  ``CONFIG_XEN_GNTDEV_DMABUF``; ``EINVAL``: an x86 PV Dom0). Each present copies the guest's
  pixels into one of two display-owned dumb buffers per (framebuffer, output), never the one
  on screen, in a worker thread shared fairly between guests (:mod:`displback.backend.copies`).
  Neither memory goes while the thread runs: the mapping is closed only when no copy reads
  it, a dumb buffer being filled is released when its copy ends. A released framebuffer's
  dumb buffer still on screen is kept until the output shows another frame, instead of being
  copied once more by the output (:meth:`BufferStore._retire`).
* ``BACKEND`` — ``be-alloc``: Dom0 allocates the pages (a dumb buffer on real hardware),
  grants them to the guest (``DMABUF_IMP_TO_REFS``) and writes the refs into the guest's
  directory pages; outputs import our own dma-buf.

If an output refuses to import (:class:`ImportRefused`: pitch alignment, format, no PRIME)
the framebuffer falls back to copying on that output — from a lazily made CPU mapping of the
same pages — unless the policy is ``REQUIRE``, which answers the flip ``-EOPNOTSUPP``. The
refusal is logged once per buffer.

Telling "cannot export" from "bad grant"
----------------------------------------
gntdev answers ``EINVAL`` both for grants it cannot map and for a Dom0 that cannot export at
all. Until one export has succeeded, an ``EINVAL`` is settled by mapping the same refs
read-write: if that fails too the guest's refs are bad (``-EINVAL``, nothing kept); if it
works the platform cannot export, which is remembered (logged once) and the mapping becomes
the buffer's copy mapping. Once an export has worked, ``EINVAL`` means bad refs.

DBUF_DESTROY and WAIT_FREE
--------------------------
After the OK of DBUF_DESTROY the backend must not touch the guest's pages (§4.2). Framebuffers
still attached to the buffer are detached first (the spec is silent; Linux detaches before it
destroys, so this only matters for a misbehaving guest, and the alternative — refusing — would
leave the guest unable ever to free the pages). Every output releases its framebuffers of the
buffer (an output keeps showing a private copy of a frame on screen). Then per kind:

* ``COPY``: unmap, answer.
* ``ZERO_COPY``: our fd is turned into a reserved number with ``dup2(/dev/null, fd)`` — our
  dma-buf reference is dropped but no later export can get that number, because
  ``DMABUF_EXP_WAIT_RELEASED`` is keyed by it (see :mod:`displback.backend.deferred`). Then
  wait up to ``wait_free_ms`` in a worker thread: released → close the number and answer;
  timeout → answer anyway and hand the number to :class:`DeferredReleases`.
* ``BACKEND``: hand our fd, still granted, to the daemon's
  :class:`~displback.backend.retained.RetainedMemory`: the guest may still map the pages (a
  hostile one need not unmap), so they stay the guest's, granted and charged, until its
  domain dies; a later be-alloc buffer of the guest reuses them with the same refs.

Accounting
----------
Everything Dom0 holds for the guest is charged to its domain's
:class:`~displback.backend.quotas.Quota` when it is made and given back when it is let go:
the buffer count at DBUF_CREATE/DESTROY; its pages until Dom0 no longer maps them (after the
wait, or when a deferred entry is released); framebuffers at FB_ATTACH/DETACH; each output's
import or copy buffers (count and bytes) when first needed, until the framebuffer is
released. A request that would pass a limit fails (``-ENOMEM``); a frame that would need more
copy memory than the guest may hold is dropped (logged) and its flip still completes. A guest
whose deferred list is full gets ``-ENOMEM`` for DBUF_CREATE until entries drain.
"""

from __future__ import annotations

import enum
import errno as _errno
import functools
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import outcome
import trio

from displback.backend.copies import CopyWorkers, FrameCopy, default_copy_workers
from displback.backend.deferred import DeferredReleases, Logger, default_logger
from displback.backend.errors import RequestError
from displback.backend.guestmem import (
    errno_for_os_error,
    fill_directory,
    map_buffer,
    read_directory,
)
from displback.backend.quotas import Quota, QuotaExceeded
from displback.backend.retained import KeptMemory, RetainedMemory
from displback.backend.throttle import LogThrottle
from displback.display.interface import (
    DisplayError,
    DumbFramebuffer,
    Framebuffer,
    ImportRefused,
    LandedCallback,
    Output,
    UnsupportedFormat,
)
from displback.display.pixels import frame_end
from displback.mapping import DmabufMapping
from displback.protocol.constants import (
    EDID_BLOCK_SIZE,
    EDID_MAX_SIZE,
    EEXIST,
    EINVAL,
    EIO,
    ENOENT,
    ENOMEM,
    EOPNOTSUPP,
    EPERM,
    PAGE_SIZE,
    PixelFormat,
    pages_for,
    pitch_for,
)
from displback.protocol.errors import ProtocolError
from displback.protocol.messages import (
    DbufCreateReq,
    DbufDestroyReq,
    FbAttachReq,
    FbDetachReq,
    GetEdidReq,
)
from displback.xen.interfaces import DmaBufs, GrantDevice, GrantMapping

__all__ = [
    "BufferInfo",
    "BufferKind",
    "BufferStore",
    "BufferStoreStats",
    "GuestFramebuffer",
    "ZeroCopyPolicy",
]

#: How often a repeated quota refusal of one guest is logged (seconds).
QUOTA_LOG_INTERVAL = 10.0


class ZeroCopyPolicy(enum.Enum):
    """Whether guest buffers are scanned out directly: when possible, always, or never."""

    AUTO = "auto"
    REQUIRE = "require"
    OFF = "off"


class BufferKind(enum.Enum):
    """Where a display buffer's pages come from and how outputs reach them."""

    ZERO_COPY = "zero-copy"
    COPY = "copy"
    BACKEND = "be-alloc"


@dataclass(frozen=True, slots=True)
class BufferInfo:
    """A snapshot of one display buffer (for logs, status and tests).

    ``dmabuf_fd`` is the exported (``ZERO_COPY``) or allocated (``BACKEND``) dma-buf fd
    number, None for ``COPY``. Width, height and bpp are 0 for a pending (PRIME) buffer.
    """

    dbuf_cookie: int
    kind: BufferKind
    width: int
    height: int
    bpp: int
    buffer_sz: int
    data_ofs: int
    npages: int
    dmabuf_fd: int | None
    framebuffers: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class BufferStoreStats:
    """Live buffers and pages by kind, and what happened since the store was made.

    ``deferred``: destroys whose wait timed out (handed to the deferred list);
    ``import_fallbacks``: (framebuffer, output) pairs that copy because the output refused
    the import.
    """

    buffers: int
    pages: int
    framebuffers: int
    zero_copy: int
    copy: int
    backend_allocated: int
    deferred: int
    import_fallbacks: int


class _RateLimitedLog:
    """Logs the first of a burst of similar lines, then one per ``interval`` with a count."""

    def __init__(
        self, log: Logger, interval: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._log = log
        self._throttle = LogThrottle(interval, clock)

    def warning(self, message: str) -> None:
        suppressed = self._throttle.allow()
        if suppressed is None:
            return
        if suppressed:
            message += f" ({suppressed} similar refusals not logged)"
        self._log.warning(message)


@dataclass(eq=False, slots=True)
class _DisplayBuffer:
    """One DBUF_CREATE's buffer and what Dom0 holds for it."""

    dbuf_cookie: int
    kind: BufferKind
    width: int
    height: int
    bpp: int
    buffer_sz: int
    data_ofs: int
    npages: int
    refs: tuple[int, ...]
    fd: int | None = None
    cpu: GrantMapping | DmabufMapping | None = None
    fbs: dict[int, GuestFramebuffer] = field(default_factory=dict)
    refusal_logged: bool = False
    # Why its frames are copied: a COPY buffer's reason, or "<output>: <why>" per output
    # that refused to import it (for the status).
    copy_reasons: list[str] = field(default_factory=list)
    dmabuf_pages: int = 0  # BACKEND: pages of our dma-buf (a reused one may be larger)
    # BACKEND: the refs of all dmabuf_pages pages and the gntdev whose import they are.
    grant_refs: tuple[int, ...] = ()
    grant_device: GrantDevice | None = None
    # Copies reading ``cpu`` in a worker thread; ``cpu`` is closed only when none is left.
    copies: int = 0
    copies_done: trio.Event | None = None

    def copy_ended(self) -> None:
        self.copies -= 1
        if self.copies == 0 and self.copies_done is not None:
            self.copies_done.set()
            self.copies_done = None

    async def no_copies(self) -> None:
        """Return once no copy reads this buffer's pages (a running copy is not stopped)."""
        while self.copies:
            if self.copies_done is None:
                self.copies_done = trio.Event()
            await self.copies_done.wait()

    @property
    def has_geometry(self) -> bool:
        return not (self.width == 0 and self.height == 0 and self.bpp == 0)

    @property
    def span(self) -> int:
        return self.npages * PAGE_SIZE


@dataclass(eq=False, slots=True)
class _OnOutput:
    """A framebuffer's display objects on one output."""

    imported: Framebuffer | None = None
    copying: bool = False
    dumbs: list[DumbFramebuffer] = field(default_factory=list)
    next_dumb: int = 0
    # The dumb buffer a worker thread is copying into: its release waits for the copy.
    filling: DumbFramebuffer | None = None


class GuestFramebuffer:
    """A guest framebuffer (FB_ATTACH) and its display framebuffers on each output."""

    def __init__(
        self,
        store: BufferStore,
        buffer: _DisplayBuffer,
        *,
        fb_cookie: int,
        width: int,
        height: int,
        fourcc: PixelFormat,
        pitch: int,
        offset: int,
    ) -> None:
        self._store = store
        self._buffer = buffer
        self.fb_cookie = fb_cookie
        self.width = width
        self.height = height
        self.fourcc = fourcc
        self.pitch = pitch
        self.offset = offset
        self._outputs: dict[Output, _OnOutput] = {}
        self._released = False

    @property
    def dbuf_cookie(self) -> int:
        """The display buffer this framebuffer lives in."""
        return self._buffer.dbuf_cookie

    @property
    def zero_copy(self) -> bool:
        """Whether outputs scan the buffer out directly (no output has had to fall back)."""
        return (
            self._buffer.kind is not BufferKind.COPY
            and self._store.policy is not ZeroCopyPolicy.OFF
            and not any(state.copying for state in self._outputs.values())
        )

    @property
    def released(self) -> bool:
        """True once detached (or its buffer destroyed): it can no longer be presented."""
        return self._released

    def __repr__(self) -> str:
        state = " released" if self._released else ""
        return (
            f"<GuestFramebuffer 0x{self.fb_cookie:x} on 0x{self.dbuf_cookie:x} "
            f"{self.width}x{self.height} {self.fourcc.name} pitch {self.pitch} "
            f"offset {self.offset}{state}>"
        )

    async def present_on(self, output: Output) -> Framebuffer:
        """The display framebuffer to flip to on ``output`` to show this framebuffer now.

        Zero-copy: the output's import of the dma-buf, made on first use and cached. Copy:
        one of two dumb buffers of this output, alternately and never the one on screen,
        freshly filled from the guest's pages in a worker thread (:mod:`displback.backend.
        copies`). Call it with no flip pending on ``output`` (flips are serialised per
        output). Raises :class:`RequestError`: ``ENOENT`` once released (also when released
        while copying), ``EOPNOTSUPP`` when the output refuses the import under ``REQUIRE``,
        ``EINVAL`` for a framebuffer the output cannot show at all, ``EIO`` for other
        display failures.
        """
        direct = self.present_now(output)
        if direct is not None:
            return direct
        return await self._copy_to(output, self._outputs[output])

    def present_now(self, output: Output) -> Framebuffer | None:
        """:meth:`present_on` without waiting: the zero-copy framebuffer (imported now if
        need be), or None when this frame must be copied (then await :meth:`present_on`).
        Raises as :meth:`present_on` does."""
        if self._released:
            raise RequestError(ENOENT, f"framebuffer 0x{self.fb_cookie:x} was released")
        store = self._store
        if all(output is not known for known in store.outputs):
            raise ValueError(f"{output!r} is not an output of this device")
        state = self._outputs.get(output)
        if state is None:
            state = self._outputs[output] = _OnOutput()
        store._release_retired(output)
        if state.imported is not None:
            return state.imported
        buffer = self._buffer
        direct = buffer.kind is not BufferKind.COPY and store.policy is not ZeroCopyPolicy.OFF
        if direct and not state.copying:
            state.imported = self._import(output, state)
            return state.imported
        return None

    def _import(self, output: Output, state: _OnOutput) -> Framebuffer | None:
        buffer = self._buffer
        assert buffer.fd is not None
        self._store._take("display_fbs", 1, f"importing framebuffer 0x{self.fb_cookie:x}")
        imported = False
        try:
            fb = output.import_dmabuf(
                buffer.fd,
                width=self.width,
                height=self.height,
                pitch=self.pitch,
                offset=self.offset,
                fourcc=self.fourcc,
            )
            imported = True
            return fb
        except ImportRefused as exc:
            store = self._store
            if store.policy is ZeroCopyPolicy.REQUIRE:
                raise RequestError(
                    EOPNOTSUPP,
                    f"output {output.name} cannot scan out framebuffer 0x{self.fb_cookie:x} "
                    f"directly ({exc.reason}) and zero-copy is required",
                ) from exc
            if not buffer.refusal_logged:
                buffer.refusal_logged = True
                store.log.warning(
                    f"dom{store.domid}: output {output.name} refuses to import buffer "
                    f"0x{buffer.dbuf_cookie:x} ({exc.reason}); copying its frames instead"
                )
            state.copying = True
            store._import_fallbacks += 1
            reason = f"{output.name} refused the import: {exc.reason}"
            if reason not in buffer.copy_reasons:
                buffer.copy_reasons.append(reason)
            return None
        except DisplayError as exc:
            raise RequestError(EIO, f"output {output.name}: import failed: {exc}") from exc
        finally:
            if not imported:
                self._store.quota.give("display_fbs")

    def present_later(
        self,
        output: Output,
        ready: Callable[[outcome.Outcome[Framebuffer | None]], None],
        on_landed: LandedCallback | None = None,
    ) -> None:
        """:meth:`present_on` for a frame :meth:`present_now` said must be copied, without a
        task waiting: the copy starts now, in a worker thread, and ``ready`` is called on the
        event loop with the framebuffer to flip to (or the :class:`RequestError` of
        :meth:`present_on`) once it is made. ``ready`` must not raise. Raises at once what
        prevents the copy from starting (no copy buffer, no thread).

        With ``on_landed``, the thread that copies may flip too, right after the copy
        (:meth:`~displback.display.interface.Output.native_flip`, asked when the copy starts):
        then ``ready`` gets None — the flip is under way and ``on_landed`` is called when it
        lands, as after ``output.start_flip(fb, on_landed)`` — or the flip's error."""
        if self._released:
            raise RequestError(ENOENT, f"framebuffer 0x{self.fb_cookie:x} was released")
        state = self._outputs[output]
        target, copy = self._prepare_copy(output, state)
        try:
            self._store.copies.submit(
                self._store.domid,
                copy,
                functools.partial(self._copied_later, output, state, target, ready),
                skip=self._gone,
                flip=(
                    None if on_landed is None
                    else functools.partial(output.native_flip, target, on_landed)
                ),
            )
        except BaseException:
            self._copy_ended(output, state, target)
            raise

    def _copied_later(
        self,
        output: Output,
        state: _OnOutput,
        target: DumbFramebuffer,
        ready: Callable[[outcome.Outcome[Framebuffer | None]], None],
        result: outcome.Outcome[bool | None],
    ) -> None:
        ready(outcome.capture(self._copied, output, state, target, result))

    async def _copy_to(self, output: Output, state: _OnOutput) -> Framebuffer:
        target, copy = self._prepare_copy(output, state)
        result: outcome.Outcome[None] = outcome.Value(None)
        try:
            await self._store.copies.run(self._store.domid, copy, skip=self._gone)
        except ValueError as exc:
            result = outcome.Error(exc)
        except BaseException:
            self._copy_ended(output, state, target)
            raise
        shown = self._copied(output, state, target, result)
        assert shown is not None  # (no flip was handed to the thread)
        return shown

    def _prepare_copy(
        self, output: Output, state: _OnOutput
    ) -> tuple[DumbFramebuffer, FrameCopy]:
        """The dumb buffer to copy the frame into (of two, never the one on screen) and the
        copy to run; from here until :meth:`_copy_ended`, the source pages stay mapped
        (``_free`` waits for ``buffer.copies``) and the target allocated (``_release`` leaves
        ``filling`` to us), whatever happens on the loop meanwhile: a detach, a destroy, a
        teardown."""
        store = self._store
        buffer = self._buffer
        source = store._cpu_view(buffer)
        target: DumbFramebuffer | None = None
        for index in (state.next_dumb, 1 - state.next_dumb):
            if index == len(state.dumbs):
                state.dumbs.append(self._create_dumb(output))
            if state.dumbs[index] is not output.current_fb:
                target = state.dumbs[index]
                state.next_dumb = 1 - index
                break
        assert target is not None  # at most one of the two is on screen
        copy = FrameCopy(
            source.buffer,
            self.offset,
            self.pitch,
            target.buffer,
            0,
            target.pitch,
            self.width * self.fourcc.cpp,
            self.height,
        )
        state.filling = target
        buffer.copies += 1
        return target, copy

    def _copied(
        self,
        output: Output,
        state: _OnOutput,
        target: DumbFramebuffer,
        result: outcome.Outcome[bool | None],
    ) -> Framebuffer | None:
        """The copy into ``target`` ran (``result``): the framebuffer to flip to, or None if
        the copy thread flipped to it (the output lands it; a release meanwhile changes
        nothing: ``target`` is ours, not the guest's)."""
        self._copy_ended(output, state, target)
        try:
            flipped = result.unwrap()
        except ValueError as exc:  # FB_ATTACH checked the bounds: only a display oddity
            raise RequestError(EIO, f"copying framebuffer 0x{self.fb_cookie:x}: {exc}") from exc
        if flipped:
            return None
        if self._released:
            raise RequestError(ENOENT, f"framebuffer 0x{self.fb_cookie:x} was released")
        return target

    def _copy_ended(self, output: Output, state: _OnOutput, target: DumbFramebuffer) -> None:
        """The copy into ``target`` ran or never will: its memory may go (a target released
        meanwhile is retired before the source pages may be unmapped)."""
        state.filling = None
        try:
            if self._released:  # detached or destroyed while we copied: ours to release now
                self._store._retire(output, target)
        finally:
            self._buffer.copy_ended()  # whatever happened: a teardown waits for this

    def _gone(self) -> bool:
        """Whether the framebuffer went (a copy of it that waited for its turn is not made)."""
        return self._released

    def _create_dumb(self, output: Output) -> DumbFramebuffer:
        """A copy buffer for this framebuffer on ``output``, charged to the guest (count and
        bytes: what a display allocates, whole pages of at least one row per line)."""
        store = self._store
        estimate = pages_for(self.width * self.fourcc.cpp * self.height) * PAGE_SIZE
        what = f"a copy buffer for framebuffer 0x{self.fb_cookie:x} on {output.name}"
        store._take("copy_bytes", estimate, what)
        try:
            store._take("display_fbs", 1, what)
        except RequestError:
            store.quota.give("copy_bytes", estimate)
            raise
        dumb: DumbFramebuffer | None = None
        try:
            dumb = output.create_dumb(width=self.width, height=self.height, fourcc=self.fourcc)
            return dumb
        except (UnsupportedFormat, ValueError) as exc:
            raise RequestError(
                EINVAL, f"output {output.name} cannot show framebuffer {self!r}: {exc}"
            ) from exc
        except DisplayError as exc:
            raise RequestError(EIO, f"output {output.name}: {exc}") from exc
        except OSError as exc:  # the display's allocator failed (ENOMEM, EMFILE, ...)
            raise RequestError(
                errno_for_os_error(exc),
                f"output {output.name} cannot allocate a copy buffer: {exc}",
            ) from exc
        finally:
            # Charge what the display really allocated (its pitch may be aligned).
            if dumb is None:
                store.quota.give("display_fbs")
                store.quota.give("copy_bytes", estimate)
            elif dumb.size > estimate:
                store.quota.force("copy_bytes", dumb.size - estimate)
            elif dumb.size < estimate:
                store.quota.give("copy_bytes", estimate - dumb.size)

    def _release(self) -> None:
        """Release every display framebuffer of this one, on every output; idempotent.

        Gives back the framebuffer to the guest's account; each display object is given back
        when it is released. A dumb buffer a copy is filling is released when the copy ends;
        one the output may still scan out is retired (see :meth:`BufferStore._retire`).
        """
        store = self._store
        if not self._released:
            store.quota.give("framebuffers")
        self._released = True
        outputs, self._outputs = self._outputs, {}
        for output, state in outputs.items():
            for dumb in state.dumbs:
                if dumb is not state.filling:
                    store._retire(output, dumb)
            if state.imported is not None:
                store._release_display_fb(output, state.imported)


class BufferStore:
    """The display buffers and framebuffers of one guest device.

    ``grants`` is the device's gntdev (kept open by the caller; hand it to
    :meth:`DeferredReleases.close_device_when_drained` at teardown), ``dmabufs`` allocates
    be-alloc buffers and maps dma-bufs for copying, ``outputs`` are the device's connector
    outputs, ``deferred`` the daemon-wide list of destroys whose wait timed out.
    """

    def __init__(
        self,
        *,
        domid: int,
        grants: GrantDevice,
        dmabufs: DmaBufs,
        outputs: Sequence[Output],
        quota: Quota,
        deferred: DeferredReleases,
        be_alloc: bool,
        policy: ZeroCopyPolicy = ZeroCopyPolicy.AUTO,
        wait_free_ms: int = 2000,
        log: Logger | None = None,
        quota_log_clock: Callable[[], float] = time.monotonic,
        retained: RetainedMemory | None = None,
        copies: CopyWorkers | None = None,
    ) -> None:
        if wait_free_ms < 0:
            raise ValueError("wait_free_ms must not be negative")
        self.domid = domid
        self.grants = grants
        self.dmabufs = dmabufs
        self.outputs = tuple(outputs)
        self.quota = quota
        self.deferred = deferred
        self.be_alloc = be_alloc
        self.policy = policy
        self.wait_free_ms = wait_free_ms
        self.log = log if log is not None else default_logger("displback.buffers")
        # Where be-alloc memory goes once Dom0 is done with it (None: freed at once, for
        # tests of the store alone).
        self.retained = retained
        self._copies = copies
        # Dumb buffers of released framebuffers that an output may still scan out (_retire).
        self._retired: dict[Output, list[DumbFramebuffer]] = {}
        self._refusals = _RateLimitedLog(self.log, QUOTA_LOG_INTERVAL, quota_log_clock)
        self._buffers: dict[int, _DisplayBuffer] = {}
        self._creating: set[int] = set()  # cookies of guest buffers being created
        self._fbs: dict[int, GuestFramebuffer] = {}
        # None until the first export settles whether this platform can export dma-bufs.
        self._export_supported: bool | None = None
        self._export_refusal: str | None = None  # why it cannot, once known
        self._deferred_count = 0
        self._import_fallbacks = 0
        self._closed = False
        # What DBUF_DESTROY dup2()s over a dma-buf fd to keep its number reserved. Opened now,
        # so that the reservation itself needs no free descriptor: under fd exhaustion a
        # destroy could otherwise neither reserve nor close its fd, and the guest's pages
        # would stay mapped for good.
        self._placeholder = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)

    # -- state ---------------------------------------------------------------------------

    @property
    def copies(self) -> CopyWorkers:
        """Where copy-mode copies run: given, or the daemon's (one per trio run)."""
        if self._copies is None:
            self._copies = default_copy_workers()
        return self._copies

    @property
    def stats(self) -> BufferStoreStats:
        """Counts of live buffers, pages and framebuffers; deferred destroys; fallbacks."""
        kinds = [b.kind for b in self._buffers.values()]
        return BufferStoreStats(
            buffers=len(self._buffers),
            pages=sum(b.npages for b in self._buffers.values()),
            framebuffers=len(self._fbs),
            zero_copy=kinds.count(BufferKind.ZERO_COPY),
            copy=kinds.count(BufferKind.COPY),
            backend_allocated=kinds.count(BufferKind.BACKEND),
            deferred=self._deferred_count,
            import_fallbacks=self._import_fallbacks,
        )

    def copy_reasons(self) -> dict[str, int]:
        """Why frames are copied rather than scanned out: reason → buffers it applies to."""
        reasons: dict[str, int] = {}
        for buffer in self._buffers.values():
            for reason in buffer.copy_reasons:
                reasons[reason] = reasons.get(reason, 0) + 1
        return reasons

    @property
    def export_supported(self) -> bool | None:
        """Whether the platform exports guest pages as dma-bufs (None: not tried yet)."""
        return self._export_supported

    def buffer_info(self, dbuf_cookie: int) -> BufferInfo:
        """A snapshot of buffer ``dbuf_cookie``; ``RequestError(ENOENT)`` if unknown."""
        buffer = self._buffer(dbuf_cookie)
        return BufferInfo(
            dbuf_cookie=buffer.dbuf_cookie,
            kind=buffer.kind,
            width=buffer.width,
            height=buffer.height,
            bpp=buffer.bpp,
            buffer_sz=buffer.buffer_sz,
            data_ofs=buffer.data_ofs,
            npages=buffer.npages,
            dmabuf_fd=buffer.fd,
            framebuffers=tuple(buffer.fbs),
        )

    def framebuffer(self, fb_cookie: int) -> GuestFramebuffer:
        """The attached framebuffer ``fb_cookie``; ``RequestError(ENOENT)`` if unknown."""
        fb = self._fbs.get(fb_cookie)
        if fb is None:
            raise RequestError(ENOENT, f"unknown framebuffer 0x{fb_cookie:x}")
        return fb

    def _buffer(self, dbuf_cookie: int) -> _DisplayBuffer:
        buffer = self._buffers.get(dbuf_cookie)
        if buffer is None:
            raise RequestError(ENOENT, f"unknown display buffer 0x{dbuf_cookie:x}")
        return buffer

    def _check_open(self) -> None:
        if self._closed:
            raise RequestError(EIO, "the device is being torn down")

    # -- DBUF_CREATE ---------------------------------------------------------------------

    async def create(self, req: DbufCreateReq) -> None:
        """DBUF_CREATE: make the buffer ready (or fill the be-alloc directory), or raise."""
        await trio.lowlevel.checkpoint()
        _validate(req.validate)
        self._check_open()
        cookie = req.dbuf_cookie
        if cookie in self._buffers or cookie in self._creating:
            raise RequestError(EEXIST, f"display buffer 0x{cookie:x} exists")
        if req.be_alloc and not self.be_alloc:
            raise RequestError(EPERM, "REQ_ALLOC without be-alloc")
        npages = req.npages
        try:
            self.quota.check_buffer(npages)
        except QuotaExceeded as exc:
            self._refusals.warning(f"dom{self.domid}: DBUF_CREATE refused: {exc}")
            raise RequestError(exc.errno, str(exc)) from exc
        if self.quota.deferred >= self.quota.limits.max_deferred:
            message = (
                f"{self.quota.deferred} destroyed buffers of this guest are "
                "still imported; no new buffers until they are released"
            )
            self._refusals.warning(f"dom{self.domid}: DBUF_CREATE refused: {message}")
            raise RequestError(ENOMEM, message)
        if req.be_alloc:
            buffer = self._create_backend(req)
            # No await since check_buffer: the charge cannot fail.
            self.quota.charge(npages)
        else:
            buffer = await self._create_guest_off_loop(req)
        self._buffers[cookie] = buffer
        self.log.debug(
            f"dom{self.domid}: buffer 0x{cookie:x} created: {buffer.kind.value}, "
            f"{req.width}x{req.height}x{req.bpp}, {npages} pages"
        )

    def _new_buffer(
        self, req: DbufCreateReq, kind: BufferKind, refs: tuple[int, ...]
    ) -> _DisplayBuffer:
        return _DisplayBuffer(
            dbuf_cookie=req.dbuf_cookie,
            kind=kind,
            width=req.width,
            height=req.height,
            bpp=req.bpp,
            buffer_sz=req.buffer_sz,
            data_ofs=req.data_ofs,
            npages=req.npages,
            refs=refs,
        )

    async def _create_guest_off_loop(self, req: DbufCreateReq) -> _DisplayBuffer:
        """:meth:`_create_guest` in a worker thread, within the guest's share of the copy
        workers: reading a directory and mapping or exporting its grants is one gntdev call
        per directory page and one for up to 8187 grefs (7-13 ms for the largest buffer),
        which on the event loop held every guest's flips while one guest churned buffers.

        The buffer is charged and its cookie reserved before the wait, so concurrent creates
        of the guest's rings see both; a create that fails or is cancelled before its thread
        ran gives them back. A thread that ran is always waited for (the copy workers never
        abandon one), and its buffer is in the table before the next checkpoint: a teardown
        releases it like any other.
        """
        npages, cookie = req.npages, req.dbuf_cookie
        self.quota.charge(npages)
        self._creating.add(cookie)
        created: list[_DisplayBuffer] = []
        try:
            await self.copies.run(self.domid, lambda: created.append(self._create_guest(req)))
        finally:
            self._creating.discard(cookie)
            if not created:
                self.quota.release(npages)
        return created[0]

    def _create_guest(self, req: DbufCreateReq) -> _DisplayBuffer:
        if self.policy is ZeroCopyPolicy.REQUIRE and self._export_supported is False:
            raise RequestError(EOPNOTSUPP, "zero-copy is required but cannot be done here")
        refs = read_directory(self.grants, self.domid, req.gref_directory, req.npages)
        if self.policy is ZeroCopyPolicy.OFF or self._export_supported is False:
            buffer = self._new_buffer(req, BufferKind.COPY, refs)
            buffer.cpu = map_buffer(self.grants, self.domid, refs, writable=False)
            if self.policy is ZeroCopyPolicy.OFF:
                buffer.copy_reasons.append("zero_copy is off")
            else:
                buffer.copy_reasons.append(self._export_refusal or "cannot export dma-bufs")
            return buffer
        try:
            fd = self.grants.dmabuf_export(self.domid, list(refs))
        except OSError as exc:
            return self._export_failed(req, refs, exc)
        if not self._export_supported:
            self._export_supported = True
            self.log.info(f"dom{self.domid}: guest buffers are exported as dma-bufs (zero-copy)")
        buffer = self._new_buffer(req, BufferKind.ZERO_COPY, refs)
        buffer.fd = fd
        return buffer

    def _export_failed(
        self, req: DbufCreateReq, refs: tuple[int, ...], exc: OSError
    ) -> _DisplayBuffer:
        """Settle a failed export: bad refs (raise), or a platform that cannot export (copy)."""
        if exc.errno == _errno.ENOTTY:
            reason = "the kernel has no gntdev dma-buf support (ENOTTY)"
            mapping = None
        elif exc.errno == _errno.EINVAL and self._export_supported is None:
            # Bad refs or no export on this Dom0? Mapping the same refs tells (see top).
            mapping = map_buffer(self.grants, self.domid, refs, writable=True)
            reason = "this Dom0 cannot export grants as dma-bufs (EINVAL; x86 PV?)"
        else:
            raise RequestError(
                errno_for_os_error(exc), f"cannot export buffer 0x{req.dbuf_cookie:x}: {exc}"
            ) from exc
        self._export_supported = False
        self._export_refusal = reason
        if self.policy is ZeroCopyPolicy.REQUIRE:
            if mapping is not None:
                mapping.close()
            self.log.warning(f"dom{self.domid}: zero-copy is required but {reason}")
            raise RequestError(EOPNOTSUPP, f"zero-copy is required but {reason}") from exc
        self.log.warning(f"dom{self.domid}: {reason}; copying guest buffers instead")
        if mapping is None:
            mapping = map_buffer(self.grants, self.domid, refs, writable=False)
        buffer = self._new_buffer(req, BufferKind.COPY, refs)
        buffer.cpu = mapping
        buffer.copy_reasons.append(reason)
        return buffer

    def _create_backend(self, req: DbufCreateReq) -> _DisplayBuffer:
        """A Dom0 buffer granted to the guest: kept memory of this guest reused if one is
        large enough (zeroed; still granted: the same refs again), else new memory charged
        to the guest and granted from its domain's gntdev (see retained.py)."""
        npages = req.npages
        kept = self._reuse(npages)
        if kept is None:
            what = f"{npages} pages of Dom0 memory for buffer 0x{req.dbuf_cookie:x}"
            self._take("be_alloc_buffers", 1, what)
            try:
                self._take("be_alloc_pages", npages, what)
            except RequestError:
                self.quota.give("be_alloc_buffers")
                raise
            try:
                fd, size = self.dmabufs.alloc_dmabuf(npages * PAGE_SIZE), npages
            except OSError as exc:
                self.quota.give("be_alloc_buffers")
                self.quota.give("be_alloc_pages", npages)
                raise RequestError(ENOMEM, f"cannot allocate {npages} pages: {exc}") from exc
            refs: tuple[int, ...] | None = None
            device: GrantDevice | None = None
            granted = False
        else:
            fd, size, refs, device = kept.fd, kept.npages, kept.refs, kept.device
            granted = True  # the guest may still map it from before
        try:
            if refs is None:
                try:
                    refs, device = self._grant(fd, size)
                    granted = True
                except OSError as exc:
                    code = EOPNOTSUPP if exc.errno == _errno.ENOTTY else errno_for_os_error(exc)
                    raise RequestError(
                        code, f"cannot grant our buffer to the guest: {exc}"
                    ) from exc
            # A larger reused buffer: all of it is granted, the guest is told its first
            # npages (the rest is memory it may still map anyway). If the directory cannot
            # be filled the grants stay: the guest could guess their numbers.
            fill_directory(self.grants, self.domid, req.gref_directory, refs[:npages])
        except BaseException:
            self._let_go(fd, size, granted=granted, refs=refs, device=device)
            raise
        buffer = self._new_buffer(req, BufferKind.BACKEND, tuple(refs[:npages]))
        buffer.fd = fd
        buffer.dmabuf_pages = size
        buffer.grant_refs = refs
        buffer.grant_device = device
        return buffer

    def _grant(self, fd: int, npages: int) -> tuple[tuple[int, ...], GrantDevice]:
        """Grant our dma-buf to the guest: from its domain's gntdev (the import outlives
        this connection), or from the device's when memory is not kept (tests)."""
        if self.retained is not None:
            return self.retained.grant(self.domid, fd, npages)
        return tuple(self.grants.dmabuf_import_to_refs(fd, npages, self.domid)), self.grants

    def _reuse(self, npages: int) -> KeptMemory | None:
        """A kept dma-buf of this guest with at least ``npages`` pages, zeroed, or None."""
        if self.retained is None:
            return None
        kept = self.retained.take(self.domid, npages)
        if kept is None:
            return None
        try:
            with self.dmabufs.open_dmabuf(kept.fd) as mapping:
                # Another process of the guest may have had it: it must look new.
                mapping.buffer[: kept.npages * PAGE_SIZE] = bytes(kept.npages * PAGE_SIZE)
        except (OSError, ValueError) as exc:
            self.log.warning(f"dom{self.domid}: cannot reuse kept memory: {exc}")
            self.retained.keep(self.domid, kept.fd, kept.npages, kept.refs, kept.device)
            return None
        return kept

    def _let_go(
        self,
        fd: int,
        npages: int,
        *,
        granted: bool,
        refs: tuple[int, ...] | None = None,
        device: GrantDevice | None = None,
    ) -> None:
        """Dom0 is done with be-alloc memory ``fd``: kept for the guest with its grants if it
        was ever granted (it may still map it; still charged), else freed and given back."""
        if granted and self.retained is not None:
            self.retained.keep(self.domid, fd, npages, refs, device)
            return
        if granted and device is not None:  # no kept memory (tests): revoke, then free
            self._import_release(device, fd)
        os.close(fd)
        self.quota.give("be_alloc_buffers")
        self.quota.give("be_alloc_pages", npages)

    # -- DBUF_DESTROY --------------------------------------------------------------------

    async def destroy(self, req: DbufDestroyReq) -> None:
        """DBUF_DESTROY: after this returns, Dom0 no longer touches the guest's pages
        (or the buffer is on the deferred list because an importer holds on)."""
        await trio.lowlevel.checkpoint()
        _validate(req.validate)
        buffer = self._buffers.get(req.dbuf_cookie)
        if buffer is not None:
            await self._keep_frames(buffer.fbs.values())
        # Looked up again: another ring of the guest may have destroyed it meanwhile.
        buffer = self._buffers.pop(req.dbuf_cookie, None)
        if buffer is None:
            raise RequestError(ENOENT, f"unknown display buffer 0x{req.dbuf_cookie:x}")
        if buffer.fbs:
            self.log.info(
                f"dom{self.domid}: buffer 0x{buffer.dbuf_cookie:x} destroyed with "
                f"{len(buffer.fbs)} framebuffer(s) attached; detaching them"
            )
        self._detach_all(buffer)
        self.quota.give("buffers")
        await self._free(buffer, self.wait_free_ms)

    async def _keep_frames(self, fbs: Iterable[GuestFramebuffer]) -> None:
        """Before ``fbs`` are released: an output still showing one of their imports swaps
        in a copy of its frame made by the copy workers (in a worker thread, within the
        guest's share), so the release copies nothing on the event loop. A guest that
        detaches or destroys frames on screen in a loop (up to 32 MiB each, one per vblank
        and connector) costs its own copy slot, not every guest's flips. Nothing changes
        state here: cancelled, the release that follows makes the copy itself."""
        domid, workers = self.domid, self.copies

        async def run(copy: Callable[[], None]) -> None:
            await workers.run(domid, copy)

        for fb in list(fbs):
            for output, state in list(fb._outputs.items()):
                if state.imported is None:
                    continue
                try:
                    await output.keep_frame(state.imported, run)
                except DisplayError as exc:
                    self.log.warning(f"output {output.name}: keeping a copy of {fb!r}: {exc}")

    def _detach_all(self, buffer: _DisplayBuffer) -> None:
        for fb_cookie, fb in list(buffer.fbs.items()):
            del self._fbs[fb_cookie]
            fb._release()
        buffer.fbs.clear()

    async def _free(self, buffer: _DisplayBuffer, wait_ms: int) -> None:
        """Drop everything Dom0 holds for ``buffer`` (its framebuffers are released)."""
        # A copy thread may still read the pages: unmap only after it (it ends on its own;
        # shielded, so a cancelled destroy cannot skip the unmapping below).
        with trio.CancelScope(shield=True):
            await buffer.no_copies()
        cpu, buffer.cpu = buffer.cpu, None
        if cpu is not None:
            cpu.close()
        fd, buffer.fd = buffer.fd, None
        if buffer.kind is not BufferKind.ZERO_COPY:
            self.quota.give("pages", buffer.npages)  # zero-copy: once the wait is over
        if buffer.kind is BufferKind.BACKEND:
            assert fd is not None
            # The guest may still map the pages (a teardown, or a guest that did not unmap
            # before DBUF_DESTROY): they stay granted to it, kept for its domain.
            self._let_go(
                fd,
                buffer.dmabuf_pages,
                granted=True,
                refs=buffer.grant_refs,
                device=buffer.grant_device,
            )
        elif buffer.kind is BufferKind.ZERO_COPY:
            assert fd is not None
            await self._wait_free(buffer, fd, wait_ms)

    async def _wait_free(self, buffer: _DisplayBuffer, fd: int, wait_ms: int) -> None:
        _reserve_number(fd, self._placeholder)
        released = False
        try:
            released = await trio.to_thread.run_sync(self.grants.dmabuf_wait_released, fd, wait_ms)
        except OSError as exc:
            self.log.warning(
                f"dom{self.domid}: waiting for the release of buffer "
                f"0x{buffer.dbuf_cookie:x} failed: {exc}"
            )
        finally:
            # Whatever ended the wait (an error, an interrupt), the number stays reserved
            # until a wait has said "released". (trio does not abandon the thread on
            # cancellation, so a cancelled destroy still waits up to wait_ms first.)
            if released:
                os.close(fd)
                self.quota.give("pages", buffer.npages)
            else:
                # The pages stay mapped (and charged) until the entry is released.
                self._deferred_count += 1
                quota, npages = self.quota, buffer.npages
                quota.force("deferred")

                def done() -> None:
                    quota.give("deferred")
                    quota.give("pages", npages)

                self.deferred.add(
                    domid=self.domid,
                    grants=self.grants,
                    fd=fd,
                    dbuf_cookie=buffer.dbuf_cookie,
                    npages=buffer.npages,
                    on_done=done,
                )

    def _import_release(self, device: GrantDevice, fd: int) -> None:
        try:
            device.dmabuf_import_release(fd)
        except OSError as exc:
            self.log.warning(f"dom{self.domid}: revoking the grants of fd {fd}: {exc}")

    # -- FB_ATTACH / FB_DETACH -----------------------------------------------------------

    def attach(self, req: FbAttachReq) -> None:
        """FB_ATTACH: a framebuffer of ``req.width`` × ``req.height`` in a display buffer.

        Pitch: ``ceil(buffer width × bpp / 8)`` for a buffer with geometry (the guest's dumb
        buffer; the framebuffer may be narrower, not wider), ``fb width × cpp`` for a pending
        (PRIME) buffer; offset ``data_ofs``. The frame must fit the buffer's pages. Get the
        new framebuffer with :meth:`framebuffer`.
        """
        _validate(req.validate)
        self._check_open()
        buffer = self._buffer(req.dbuf_cookie)
        if req.fb_cookie in self._fbs:
            raise RequestError(EEXIST, f"framebuffer 0x{req.fb_cookie:x} exists")
        fourcc = req.format
        row_bytes = req.width * fourcc.cpp
        if buffer.has_geometry:
            if req.width > buffer.width:
                raise RequestError(
                    EINVAL,
                    f"framebuffer width {req.width} exceeds buffer width {buffer.width}",
                )
            pitch = pitch_for(buffer.width, buffer.bpp)
        else:
            pitch = row_bytes
        if row_bytes > pitch:
            raise RequestError(
                EINVAL, f"{req.width} {fourcc.name} pixels do not fit a pitch of {pitch} bytes"
            )
        if fourcc is PixelFormat.YUYV and req.width % 2:
            raise RequestError(EINVAL, f"YUYV needs an even width, not {req.width}")
        end = frame_end(buffer.data_ofs, pitch, row_bytes, req.height)
        if end > buffer.span:
            raise RequestError(
                EINVAL,
                f"{req.width}x{req.height} {fourcc.name} at offset {buffer.data_ofs}, pitch "
                f"{pitch} needs {end} bytes; buffer 0x{buffer.dbuf_cookie:x} has {buffer.span}",
            )
        try:
            self.quota.take("framebuffers")
        except QuotaExceeded as exc:
            self._refusals.warning(f"dom{self.domid}: FB_ATTACH refused: {exc}")
            raise RequestError(exc.errno, str(exc)) from exc
        fb = GuestFramebuffer(
            self,
            buffer,
            fb_cookie=req.fb_cookie,
            width=req.width,
            height=req.height,
            fourcc=fourcc,
            pitch=pitch,
            offset=buffer.data_ofs,
        )
        self._fbs[req.fb_cookie] = fb
        buffer.fbs[req.fb_cookie] = fb

    async def detach(self, req: FbDetachReq) -> None:
        """FB_DETACH: forget the framebuffer; outputs showing it keep its last frame."""
        await trio.lowlevel.checkpoint()
        _validate(req.validate)
        fb = self._fbs.get(req.fb_cookie)
        if fb is not None:
            await self._keep_frames([fb])
        fb = self._fbs.pop(req.fb_cookie, None)  # again: it may be gone meanwhile
        if fb is None:
            raise RequestError(ENOENT, f"unknown framebuffer 0x{req.fb_cookie:x}")
        del fb._buffer.fbs[req.fb_cookie]
        fb._release()

    # -- GET_EDID ------------------------------------------------------------------------

    async def write_edid(self, req: GetEdidReq, edid: bytes) -> int:
        """GET_EDID: write ``edid`` at offset 0 of the guest's buffer; return its size."""
        await trio.lowlevel.checkpoint()
        if not 0 < len(edid) <= EDID_MAX_SIZE or len(edid) % EDID_BLOCK_SIZE:
            raise ValueError(f"an EDID of {len(edid)} bytes is not whole 128-byte blocks")
        _validate(req.validate)
        self._check_open()
        if len(edid) > req.buffer_sz:
            raise RequestError(EINVAL, f"EDID of {len(edid)} bytes > buffer_sz {req.buffer_sz}")
        refs = read_directory(
            self.grants,
            self.domid,
            req.gref_directory,
            req.npages,
            max_refs=self.quota.limits.max_pages_per_buffer,
        )
        needed = refs[: pages_for(len(edid))]
        with map_buffer(self.grants, self.domid, needed, writable=True) as mapping:
            mapping.buffer[: len(edid)] = edid
        return len(edid)

    # -- teardown ------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Device teardown: release every framebuffer and buffer.

        Zero-copy buffers still imported somewhere are not waited for: they go to the
        deferred list at once. Idempotent.
        """
        self._closed = True
        buffers, self._buffers = list(self._buffers.values()), {}
        for buffer in buffers:
            self._detach_all(buffer)
            self.quota.give("buffers")
        for buffer in buffers:
            with trio.CancelScope(shield=True):
                await self._free(buffer, 0)
        retired, self._retired = self._retired, {}
        for output, dumbs in retired.items():
            for dumb in dumbs:
                self._release_display_fb(output, dumb, dumb.size)
        placeholder, self._placeholder = self._placeholder, -1
        if placeholder >= 0:
            os.close(placeholder)

    # -- helpers for GuestFramebuffer ----------------------------------------------------

    def _retire(self, output: Output, dumb: DumbFramebuffer) -> None:
        """Release a dumb buffer of a released framebuffer, or keep it while ``output`` may
        still scan it out (on screen, or the target of a flip in flight).

        Releasing a framebuffer on screen makes the output copy its frame on the event loop
        (it keeps showing a private copy), up to 32 MiB a guest may trigger with each
        FB_DETACH. A dumb buffer is our own memory, not the guest's: the output may as well
        go on showing it until the next frame replaces it. At most the one on screen (and
        the one of a flip in flight) stays per output; the rest goes at once.
        """
        if dumb is output.current_fb or output.flip_pending:
            self._retired.setdefault(output, []).append(dumb)
        else:
            self._release_display_fb(output, dumb, dumb.size)
        self._release_retired(output)

    def _release_retired(self, output: Output) -> None:
        """Release the retired dumb buffers ``output`` no longer scans out."""
        dumbs = self._retired.pop(output, None)
        if not dumbs:
            return
        if output.flip_pending:
            self._retired[output] = dumbs
            return
        keep = [d for d in dumbs if d is output.current_fb]
        for dumb in dumbs:
            if dumb is not output.current_fb:
                self._release_display_fb(output, dumb, dumb.size)
        if keep:
            self._retired[output] = keep

    def _release_display_fb(self, output: Output, fb: Framebuffer, copy_bytes: int = 0) -> None:
        """Release ``fb`` on ``output`` and give it back to the guest's account (a copy
        buffer also gives back its ``copy_bytes``)."""
        try:
            output.release(fb)
        except DisplayError as exc:
            self.log.warning(f"output {output.name}: releasing {fb!r}: {exc}")
        finally:
            self.quota.give("display_fbs")
            if copy_bytes:
                self.quota.give("copy_bytes", copy_bytes)

    def _take(self, resource: str, amount: int, what: str) -> None:
        """Charge ``amount`` of ``resource`` for ``what``, or fail it with ``-ENOMEM``."""
        try:
            self.quota.take(resource, amount)
        except QuotaExceeded as exc:
            self._refusals.warning(f"dom{self.domid}: refused {what}: {exc}")
            raise RequestError(exc.errno, f"{what}: {exc}") from exc

    def _cpu_view(self, buffer: _DisplayBuffer) -> GrantMapping | DmabufMapping:
        """The buffer's pages readable by the CPU, mapped on first need."""
        if buffer.cpu is None:
            if buffer.kind is BufferKind.BACKEND:
                assert buffer.fd is not None
                try:
                    buffer.cpu = self.dmabufs.open_dmabuf(buffer.fd)
                except OSError as exc:
                    raise RequestError(EIO, f"cannot map our own buffer: {exc}") from exc
            else:
                buffer.cpu = map_buffer(self.grants, self.domid, buffer.refs, writable=False)
        return buffer.cpu


def _validate(check: Callable[[], None]) -> None:
    try:
        check()
    except ProtocolError as exc:
        raise RequestError(exc.errno or EINVAL, str(exc)) from exc


def _reserve_number(fd: int, placeholder: int) -> None:
    """Replace what ``fd`` refers to by ``/dev/null``, atomically keeping the number taken.

    ``placeholder`` is an open ``/dev/null`` (the store's; -1 once closed: one is opened).
    """
    if placeholder >= 0:
        os.dup2(placeholder, fd, inheritable=False)
        return
    placeholder = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.dup2(placeholder, fd, inheritable=False)
    finally:
        os.close(placeholder)
