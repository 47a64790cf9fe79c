"""Stateful fuzzing: hypothesis drives an attacker guest through random interleavings of
requests (valid and not), ring and event-page scribbles, forged directories, XenStore
writes to its own nodes, notification bursts, driver reloads, crashes and new domains —
beside the honest guest of :mod:`tests.hostile.support` — and checks the arena's
invariants after every step: the daemon serves, the honest guest is unharmed and shows its
own pixels, no quota is exceeded; each attacker domain leaves nothing behind; at the end
of an example the honest guest kept its rate.

``make test`` runs a few cheap examples (profile ``ci``: reproducible); ``make fuzz`` runs
many (``DISPLBACK_FUZZ=N`` examples, profile ``fuzz``) and prints what it did.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import struct
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import trio
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from displback.protocol.constants import Op
from displback.protocol.layout import (
    EVT_EVENT_CHANNEL,
    EVT_RING_REF,
    REQ_EVENT_CHANNEL,
    REQ_RING_REF,
    STATE,
    connector_dir,
)
from displback.sim.guest import GuestBuffer, GuestFb, GuestRequestError, SimGuest
from displback.sim.hypervisor import HypervisorThread, wait_for_no_leaks
from displback.sim.platform import client_resources
from displback.xenstore.wire import XenStoreError
from tests.backend.support import paint
from tests.hostile.support import ATTACKER, WINDOW, Arena, arena, starved

T = TypeVar("T")

settings.register_profile(
    "ci", max_examples=12, stateful_step_count=10, deadline=None, derandomize=True,
    database=None, suppress_health_check=list(HealthCheck),
)
settings.register_profile(
    "fuzz", max_examples=int(os.environ.get("DISPLBACK_FUZZ") or 200),
    stateful_step_count=40, deadline=None, database=None,
    suppress_health_check=list(HealthCheck),
)
PROFILE = "fuzz" if os.environ.get("DISPLBACK_FUZZ") else "ci"
SPEC = "connectors=c0:320x240;c1:320x240"
#: Crashes and driver reloads per example.
MAX_LIFECYCLES = 3
#: What one step may take before it counts as a hang.
STEP_TIMEOUT = 20.0


class Totals:
    """What the fuzzer did, over every example of this run."""

    examples = 0
    steps = 0
    invariants = 0
    crashes = 0
    reconnects = 0
    resets = 0
    errors: dict[str, int] = {}

    @classmethod
    def report(cls, seconds: float) -> str:
        top = sorted(cls.errors.items(), key=lambda kv: -kv[1])[:8]
        return (f"fuzz: {cls.examples} examples, {cls.steps} steps, {cls.invariants} "
                f"invariant checks, {cls.crashes} crashes, {cls.reconnects} reconnects, "
                f"{cls.resets} device resets, in {seconds:.1f} s; refusals seen: {top}")


class World:
    """One example's machine, running its trio loop on a thread of its own so that the
    state machine's (synchronous) rules can call into it."""

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="displback-fuzz-"))
        self.before = client_resources()
        self.hv = HypervisorThread(str(self.tmp / "xen.sock"))
        self.arena: Arena | None = None
        self.guest: SimGuest | None = None
        self.domid = ATTACKER
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._leave: trio.Event | None = None
        self._gone = trio.Event()
        self._finish: trio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._start_flips = 0
        self._start_time = 0.0
        self._start_starved = 0.0
        self._thread = threading.Thread(target=self._run, name="fuzz-world", daemon=True)
        self._thread.start()
        self._ready.wait(60)
        if self._error is not None:
            raise self._error
        assert self.arena is not None

    # -- the world's own thread ------------------------------------------------------------

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # reported to the state machine
            self._error = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._finish = trio.Event()
        with trio.fail_after(600):
            async with arena(self.hv, self.tmp) as a, trio.open_nursery() as nursery:
                self.arena, self._nursery = a, nursery
                self._start_flips, self._start_time = a.honest_flips, trio.current_time()
                self._start_starved = starved()
                await self._spawn()
                self._ready.set()
                await self._finish.wait()
                rest = self._start_time + WINDOW - trio.current_time()
                if rest > 0:  # the rate is compared over one window at least
                    await a.flips_in(rest)
                flips = a.honest_flips - self._start_flips
                elapsed = trio.current_time() - self._start_time
                starving = starved() - self._start_starved
                await self._attacker_leaves(crash=False)
                await a.assert_rate_kept(flips, elapsed, starving)

    async def _spawn(self) -> None:
        assert self.arena is not None and self._nursery is not None
        await self.arena.machine.add_guest(self.domid, SPEC)
        self.guest = await self._nursery.start(self._attacker)
        await self.guest.wait_connected()

    async def _attacker(self, *, task_status: trio.TaskStatus[SimGuest]) -> None:
        assert self.arena is not None
        leave, gone = trio.Event(), trio.Event()
        self._leave, self._gone = leave, gone
        try:
            async with self.arena.machine.guest(self.domid, response_timeout=0.3,
                                                frame_done_timeout=0.5) as guest:
                task_status.started(guest)
                await leave.wait()
                Totals.resets += guest.stats.disconnects
        finally:
            gone.set()

    async def _attacker_leaves(self, *, crash: bool) -> None:
        assert self.arena is not None and self.guest is not None and self._leave is not None
        if crash:
            self.guest.crash()
        self._leave.set()
        await self._gone.wait()
        await self.arena.attacker_gone(self.domid)
        self.guest = None

    # -- called by the rules ---------------------------------------------------------------

    def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``fn`` in the world's loop; its GuestRequestError/XenStoreError are noted."""

        async def bounded() -> T:
            with trio.fail_after(STEP_TIMEOUT):
                return await fn()

        assert self._token is not None
        return trio.from_thread.run(bounded, trio_token=self._token)

    def check(self) -> None:
        assert self._token is not None and self.arena is not None
        trio.from_thread.run_sync(self.arena.check, trio_token=self._token)

    async def crash_and_respawn(self) -> None:
        await self._attacker_leaves(crash=True)
        self.domid += 1
        await self._spawn()

    async def reload_driver(self) -> None:
        """The attacker unloads its driver (polite close) and loads it again."""
        assert self._leave is not None and self._nursery is not None
        self._leave.set()
        await self._gone.wait()
        self.guest = await self._nursery.start(self._attacker)
        await self.guest.wait_connected()

    def close(self) -> None:
        """End the example: attacker leaves, rate checked, honest guest checked, no leaks."""
        try:
            if self._token is not None and self._finish is not None and self._error is None:
                with contextlib.suppress(trio.RunFinishedError):
                    trio.from_thread.run_sync(self._finish.set, trio_token=self._token)
            self._thread.join(120)
            assert not self._thread.is_alive(), "the example's machine did not stop"
            if self._error is not None:
                raise self._error
            assert wait_for_no_leaks(self.hv) == {}, "hypervisor resources leaked"
            assert client_resources() == self.before, "client-side resources leaked"
        finally:
            self.hv.stop()
            shutil.rmtree(self.tmp, ignore_errors=True)


def _refused(kind: str) -> None:
    Totals.errors[kind] = Totals.errors.get(kind, 0) + 1


async def _tolerant(call: Awaitable[T]) -> T | None:
    """A request the attacker may have made impossible: errors are answers, not failures."""
    try:
        return await call
    except GuestRequestError as exc:
        _refused(errno.errorcode.get(exc.errno or 0, str(exc.errno)))
    except XenStoreError as exc:
        _refused(f"xs:{exc}")
    return None


SIZES = st.sampled_from([(64, 64), (320, 240), (321, 17), (1024, 768), (0, 5), (4096, 2048)])
BPPS = st.sampled_from([32, 32, 16, 24, 8, 0, 33])
FOURCCS = st.sampled_from([0x34325258, 0x34325241, 0x36314752, 0x56595559, 0, 0xDEADBEEF])
U32 = st.integers(0, 0xFFFF_FFFF)


class AttackerMachine(RuleBasedStateMachine):
    """One example: a fresh world, then random steps of the attacker."""

    def __init__(self) -> None:
        super().__init__()
        self.world: World | None = None
        self.bufs: list[GuestBuffer] = []
        self.fbs: list[GuestFb] = []
        self.lifecycles = 0

    @initialize()
    def start(self) -> None:
        self.world = World()
        Totals.examples += 1

    @property
    def w(self) -> World:
        assert self.world is not None
        return self.world

    @property
    def g(self) -> SimGuest:
        assert self.w.guest is not None
        return self.w.guest

    def _live_bufs(self) -> list[GuestBuffer]:
        self.bufs = [b for b in self.bufs if not b.freed]
        return self.bufs

    def _step(self, fn: Callable[[], Awaitable[Any]]) -> None:
        Totals.steps += 1
        self.w.call(fn)

    # -- requests ------------------------------------------------------------------------

    @rule(size=SIZES, bpp=BPPS)
    def create_buffer(self, size: tuple[int, int], bpp: int) -> None:
        async def go() -> None:
            buf = await _tolerant(self.g.create_dumb(size[0], size[1], bpp or 32))
            if buf is not None:
                self.bufs.append(buf)

        self._step(go)

    @precondition(lambda self: bool(self._live_bufs()))
    @rule(data=st.data())
    def destroy_buffer(self, data: st.DataObject) -> None:
        buf = data.draw(st.sampled_from(self._live_bufs()))
        self._step(lambda: _tolerant(self.g.destroy_dumb(buf)))

    @precondition(lambda self: bool(self._live_bufs()))
    @rule(data=st.data(), fourcc=FOURCCS, grow=st.sampled_from([0, 0, 0, 1, 5000]))
    def attach_framebuffer(self, data: st.DataObject, fourcc: int, grow: int) -> None:
        buf = data.draw(st.sampled_from(self._live_bufs()))

        async def go() -> None:
            fb = await _tolerant(self.g.add_fb(buf, max(buf.width, 1) + grow,
                                               max(buf.height, 1), fourcc))
            if fb is not None:
                self.fbs.append(fb)

        self._step(go)

    @precondition(lambda self: bool(self.fbs))
    @rule(data=st.data())
    def detach_framebuffer(self, data: st.DataObject) -> None:
        fb = data.draw(st.sampled_from(self.fbs))
        self.fbs.remove(fb)
        self._step(lambda: _tolerant(self.g.rm_fb(fb)))

    @rule(data=st.data(), connector=st.sampled_from([0, 1]), enable=st.booleans())
    def set_config(self, data: st.DataObject, connector: int, enable: bool) -> None:
        fb = data.draw(st.sampled_from(self.fbs)) if enable and self.fbs else None
        self._step(lambda: _tolerant(self.g.set_config(connector, fb)))

    @precondition(lambda self: bool(self.fbs))
    @rule(data=st.data(), connector=st.sampled_from([0, 1]), frame=st.integers(0, 255))
    def page_flip(self, data: st.DataObject, connector: int, frame: int) -> None:
        fb = data.draw(st.sampled_from(self.fbs))

        async def go() -> None:
            if not fb.buffer.freed and fb.buffer.width:
                with contextlib.suppress(ValueError, BufferError):
                    paint(fb.buffer, fb, connector=connector, frame=frame)
            await _tolerant(self.g.page_flip(connector, fb))

        self._step(go)

    @rule(connector=st.sampled_from([0, 1]), size=st.sampled_from([1, 128, 4096, 1 << 20]))
    def get_edid(self, connector: int, size: int) -> None:
        self._step(lambda: _tolerant(self.g.get_edid(connector, buffer_sz=size)))

    @rule(op=st.sampled_from([*Op, 0, 0x7F, 0xFF]), body=st.binary(min_size=61, max_size=61),
          ring=st.sampled_from([0, 1]))
    def raw_request(self, op: int, body: bytes, ring: int) -> None:
        packet = bytes([0, 0, int(op)]) + body
        self._step(lambda: _tolerant(self.g.hostile.raw_request(ring, packet)))

    # -- shared memory -------------------------------------------------------------------

    @rule(field=st.sampled_from(["req_prod", "req_event", "rsp_prod", "rsp_event"]),
          value=U32, connector=st.sampled_from([0, 1]), kick=st.booleans())
    def scribble_ring(self, field: str, value: int, connector: int, kick: bool) -> None:
        async def go() -> None:
            with contextlib.suppress(GuestRequestError):
                self.g.hostile.scribble_ring(connector, field, value)
                if kick:
                    self.g.hostile.notify(connector)
            await trio.sleep(0.02)

        self._step(go)

    @rule(field=st.sampled_from(["in_cons", "in_prod"]), value=U32,
          connector=st.sampled_from([0, 1]))
    def scribble_event_page(self, field: str, value: int, connector: int) -> None:
        async def go() -> None:
            with contextlib.suppress(GuestRequestError):
                self.g.hostile.scribble_event_page(connector, field, value)
            await trio.sleep(0.02)

        self._step(go)

    @rule(offset=st.integers(0, 1023).map(lambda i: 4 * i), value=U32)
    def forge_next_directory(self, offset: int, value: int) -> None:
        """The next DBUF_CREATE's first directory page gets one forged u32."""

        def forge(buf: GuestBuffer) -> None:
            self.g.hostile.on_directory = None
            self.g.hostile.scribble_directory(buf, 0, offset, struct.pack("<I", value))

        async def go() -> None:
            self.g.hostile.on_directory = forge
            buf = await _tolerant(self.g.create_dumb(64, 64, 32))
            self.g.hostile.on_directory = None
            if buf is not None:
                self.bufs.append(buf)

        self._step(go)

    @rule(channel=st.sampled_from(["req", "evt"]), count=st.integers(1, 300),
          connector=st.sampled_from([0, 1]))
    def notification_burst(self, channel: str, count: int, connector: int) -> None:
        async def go() -> None:
            with contextlib.suppress(GuestRequestError):
                for _ in range(count):
                    self.g.hostile.notify(connector, channel)
            await trio.sleep(0.01)

        self._step(go)

    # -- XenStore, lifecycle -------------------------------------------------------------

    @rule(value=st.sampled_from([b"0", b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"8",
                                 b"9", b"-1", b"", b"banana", b"4294967297"]))
    def write_state(self, value: bytes) -> None:
        async def go() -> None:
            await _tolerant(self.g.xenstore.write(f"{self.g.frontend_path}/{STATE}", value))
            await trio.sleep(0.05)

        self._step(go)

    @rule(node=st.sampled_from([REQ_RING_REF, REQ_EVENT_CHANNEL, EVT_RING_REF,
                                EVT_EVENT_CHANNEL]),
          connector=st.sampled_from([0, 1, 2]),
          value=st.sampled_from([b"0", b"8", b"-1", b"4294967296", b"99999", b"", b"x"]))
    def write_transport_node(self, node: str, connector: int, value: bytes) -> None:
        path = f"{connector_dir(self.w.domid, 0, connector)}/{node}"
        self._step(lambda: _tolerant(self.g.xenstore.write(path, value)))

    # Domain creation runs the simulated toolstack, xenstored and guest in the daemon's
    # process (on real Xen they are not the daemon's CPU): a few per example.
    @precondition(lambda self: self.lifecycles < MAX_LIFECYCLES)
    @rule()
    def crash_and_come_back_as_a_new_domain(self) -> None:
        self.lifecycles += 1
        Totals.crashes += 1
        self.bufs, self.fbs = [], []
        self._step(self.w.crash_and_respawn)

    @precondition(lambda self: self.lifecycles < MAX_LIFECYCLES)
    @rule()
    def reload_the_driver(self) -> None:
        self.lifecycles += 1
        Totals.reconnects += 1
        self.bufs, self.fbs = [], []
        self._step(self.w.reload_driver)

    @rule()
    def wait_for_a_connection(self) -> None:
        """Give the device time to come back after a reset (or find it connected)."""

        async def go() -> None:
            with contextlib.suppress(trio.TooSlowError):
                await self.g.wait_connected(timeout=3)

        self._step(go)

    @invariant()
    def dom0_promises_hold(self) -> None:
        if self.world is not None:
            self.w.check()
            Totals.invariants += 1

    def teardown(self) -> None:
        if self.world is not None:
            self.world.close()
            Totals.invariants += 1


def test_random_attacks_never_break_dom0s_promises() -> None:
    start = time.monotonic()
    try:
        run_state_machine_as_test(AttackerMachine, settings=settings.get_profile(PROFILE))
    finally:
        print("\n" + Totals.report(time.monotonic() - start))
