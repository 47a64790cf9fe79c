"""The simulated guest against a minimal backend written here (not displback's backend):
handshake, requests on the wire, responses, flip events, timeouts, recovery, be-alloc, unload,
crash, misbehaviour hooks and the drawing mode."""

from __future__ import annotations

import errno
import os
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import trio

from displback.display.pixels import RgbImage, to_rgb
from displback.protocol.constants import PAGE_SIZE, Op, PixelFormat, pages_for
from displback.protocol.errors import ProtocolError
from displback.protocol.evtpage import EventProducer
from displback.protocol.flipqueue import FlipQueue, Frame
from displback.protocol.layout import (
    backend_dir,
    frontend_dir,
    parse_transports,
    transport_nodes,
)
from displback.protocol.messages import (
    DbufCreateReq,
    DbufDestroyReq,
    FbAttachReq,
    GetEdidReq,
    PgFlipReq,
    Request,
    Response,
    SetConfigReq,
    parse_request,
)
from displback.protocol.pagedir import DirectoryFiller, DirectoryReader
from displback.protocol.ring import BackRing
from displback.protocol.xenbus import XenbusState, parse_state
from displback.sim.guest import FlipOutcome, GuestRequestError, SimGuest
from displback.sim.guest_pattern import decode_pattern, draw_pattern, pattern_rgb
from displback.sim.hypervisor import HypervisorProcess, HypervisorThread
from displback.sim.platform import SimGrantMapping, SimPlatform
from displback.sim.toolstack import Toolstack
from displback.sim.xenstored import running_xenstored
from displback.xenstore.client import XenStoreClient, open_xenstore

GUEST = 3
S = XenbusState

Policy = Callable[[int, Request], "int | None"]


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``predicate`` (for counters that no event announces)."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.005)


def answer_all(_connector: int, _req: Request) -> int | None:
    return 0


class MiniBackend:
    """Just enough of a backend to drive the guest: InitWait, map + bind on frontend 3,
    Connected, answer every request by ``policy`` (errno; 0 = OK; None = never), one
    EVT_PG_FLIP per accepted PG_FLIP (through displback's own flip queue, each frame "shown"
    at once), be-alloc buffers, EDID, teardown on frontend 5/6."""

    def __init__(self, platform: SimPlatform, xs: XenStoreClient, domid: int, devid: int = 0):
        self.platform = platform
        self.xs = xs
        self.domid = domid
        self.be = backend_dir(0, domid, devid)
        self.fe = frontend_dir(domid, devid)
        self.policy: Policy = answer_all
        self.send_flip_events = True
        self.edid = bytes(range(128))
        self.reinit_after_close = True
        self.state = S.INITIALISING
        self.requests: list[tuple[int, Request]] = []
        self.unanswered: list[tuple[int, Request]] = []
        self.frontend_states: list[XenbusState] = []
        self.snapshots: list[tuple[int, int, bytes]] = []  # (connector, fb_cookie, pixels)
        self.connections = 0
        self.gntdev = platform.open_grant_device()
        self.evtchn = platform.open_event_channels()
        self.mappings: list[SimGrantMapping] = []
        self.rings: list[BackRing] = []
        self.producers: list[EventProducer] = []
        self.flip_queues: list[FlipQueue[int, None]] = []
        self.req_ports: dict[int, int] = {}  # local port -> connector
        self.evt_ports: list[int] = []
        self.buffers: dict[int, tuple[DbufCreateReq, SimGrantMapping | None, int | None]] = {}
        self.fbs: dict[int, FbAttachReq] = {}
        self.changed = trio.Event()
        self._scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None

    # -- lifetime ---------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        while await self.xs.read_or_none(f"{self.be}/online") is None:
            await trio.sleep(0.01)
        await self.set_state(S.INIT_WAIT)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            async with self.xs.watch(f"{self.fe}/state") as events:
                async for _ in events:
                    await self._frontend_changed()

    async def _frontend_changed(self) -> None:
        front = parse_state(await self.xs.read_or_none(f"{self.fe}/state"))
        if not self.frontend_states or self.frontend_states[-1] != front:
            self.frontend_states.append(front)
        self._poke()
        if front in (S.INITIALISED, S.CONNECTED) and self.state is S.INIT_WAIT:
            await self.connect()
        elif front in (S.CLOSING, S.CLOSED, S.INITIALISING) and self.state is S.CONNECTED:
            self.teardown()
            await self.set_state(S.CLOSED)
            if self.reinit_after_close:
                await self.set_state(S.INIT_WAIT)

    def _poke(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        with trio.fail_after(timeout):
            while not predicate():
                await self.changed.wait()

    async def set_state(self, state: XenbusState) -> None:
        await self.xs.write(f"{self.be}/state", state.encode())
        self.state = state
        self._poke()

    async def connect(self) -> None:
        count = 0
        while await self.xs.read_or_none(f"{self.fe}/{count}/resolution") is not None:
            count += 1
        nodes = {n: await self.xs.read_or_none(f"{self.fe}/{n}") for n in transport_nodes(count)}
        transports = parse_transports(nodes, count)
        for index, t in enumerate(transports):
            ring_map = self.gntdev.map_grants(self.domid, [t.req_ring_ref])
            evt_map = self.gntdev.map_grants(self.domid, [t.evt_ring_ref])
            self.mappings += [ring_map, evt_map]
            self.rings.append(BackRing(ring_map.buffer))
            producer = EventProducer(evt_map.buffer)
            self.producers.append(producer)
            self.flip_queues.append(FlipQueue(producer))
            self.req_ports[self.evtchn.bind_interdomain(self.domid, t.req_evtchn)] = index
            self.evt_ports.append(self.evtchn.bind_interdomain(self.domid, t.evt_evtchn))
        self.connections += 1
        assert self._nursery is not None
        self._scope = trio.CancelScope()
        self._nursery.start_soon(self._serve, self._scope)
        await self.set_state(S.CONNECTED)

    def teardown(self, *, keep_buffers: bool = False) -> None:
        if self._scope is not None:
            self._scope.cancel()
            self._scope = None
        for ring in self.rings:
            ring.release()
        for producer in self.producers:
            producer.release()
        self.rings, self.producers, self.flip_queues = [], [], []
        for port in [*self.req_ports, *self.evt_ports]:
            self.evtchn.unbind(port)
        self.req_ports, self.evt_ports = {}, []
        for mapping in self.mappings:
            mapping.close()
        self.mappings = []
        if not keep_buffers:
            self.drop_buffers()

    def drop_buffers(self) -> None:
        for cookie in list(self.buffers):
            self._drop_buffer(cookie)
        self.fbs.clear()

    def close(self) -> None:
        self.teardown()
        self.evtchn.close()
        self.gntdev.close()

    # -- requests ---------------------------------------------------------------------

    async def _serve(self, scope: trio.CancelScope) -> None:
        with scope:
            while True:
                await trio.lowlevel.wait_readable(self.evtchn.fileno())
                fired = self.evtchn.read_pending()
                for port in fired:
                    if port in self.req_ports:
                        self._process(self.req_ports[port])
                self.evtchn.unmask(fired)

    def _process(self, connector: int) -> None:
        ring = self.rings[connector]
        while True:
            for raw in ring.take_requests():
                req = parse_request(raw)
                self.requests.append((connector, req))
                status = self.policy(connector, req)
                if status is None:
                    self.unanswered.append((connector, req))
                else:
                    self.answer(connector, req, status)
            if not ring.final_check():
                break
        self._poke()

    def answer(self, connector: int, req: Request, status: int) -> None:
        edid_sz = 0
        if status == 0:
            edid_sz = self._apply(connector, req)
        rsp = Response.ok(req, edid_sz=edid_sz) if status == 0 else Response.error(req, status)
        ring = self.rings[connector]
        ring.put_response(rsp.pack())
        if ring.push_responses():
            self.evtchn.notify(next(p for p, c in self.req_ports.items() if c == connector))
        if status == 0 and isinstance(req, PgFlipReq) and self.send_flip_events:
            flips = self.flip_queues[connector]
            flips.accept_flip(req.fb_cookie, req.fb_cookie, trio.current_time())
            frame = flips.next_command()
            assert isinstance(frame, Frame)  # shown at once: none is ever in flight here
            assert flips.frame_done(frame, trio.current_time()).sent == 1
            self.evtchn.notify(self.evt_ports[connector])

    def answer_late(self) -> None:
        late, self.unanswered = self.unanswered, []
        for connector, req in late:
            self.answer(connector, req, 0)

    def _apply(self, connector: int, req: Request) -> int:
        if isinstance(req, DbufCreateReq):
            if req.be_alloc:
                fd = self.platform.alloc_dmabuf(req.buffer_sz)
                refs = self.gntdev.dmabuf_import_to_refs(fd, req.npages, self.domid)
                filler = DirectoryFiller(req.gref_directory, refs)
                while (gref := filler.next_page_gref) is not None:
                    with self.gntdev.map_grants(self.domid, [gref]) as page:
                        filler.fill(page.buffer)
                self.buffers[req.dbuf_cookie] = (req, None, fd)
            else:
                refs = list(self.read_directory(req.gref_directory, req.npages))
                mapping = self.gntdev.map_grants(self.domid, refs)
                self.buffers[req.dbuf_cookie] = (req, mapping, None)
        elif isinstance(req, DbufDestroyReq):
            self._drop_buffer(req.dbuf_cookie)
        elif isinstance(req, FbAttachReq):
            self.fbs[req.fb_cookie] = req
        elif isinstance(req, PgFlipReq | SetConfigReq) and req.fb_cookie in self.fbs:
            self.snapshots.append((connector, req.fb_cookie, self.pixels(req.fb_cookie)))
        elif isinstance(req, GetEdidReq):
            refs = list(self.read_directory(req.gref_directory, req.npages))
            with self.gntdev.map_grants(self.domid, refs) as memory:
                memory.buffer[: len(self.edid)] = self.edid
            return len(self.edid)
        return 0

    def read_directory(self, first: int, npages: int) -> tuple[int, ...]:
        reader = DirectoryReader(first, npages)
        while (gref := reader.next_page_gref) is not None:
            with self.gntdev.map_grants(self.domid, [gref], writable=False) as page:
                reader.feed(page.buffer)
        return reader.refs

    def _drop_buffer(self, cookie: int) -> None:
        _req, mapping, fd = self.buffers.pop(cookie)
        if mapping is not None:
            mapping.close()
        if fd is not None:
            self.gntdev.dmabuf_import_release(fd)
            os.close(fd)

    def pixels(self, fb_cookie: int) -> bytes:
        fb = self.fbs[fb_cookie]
        req, mapping, fd = self.buffers[fb.dbuf_cookie]
        if mapping is not None:
            return bytes(mapping.buffer[: req.buffer_sz])
        assert fd is not None
        with self.platform.open_dmabuf(fd) as view:
            return bytes(view.buffer[: req.buffer_sz])

    def ops(self) -> list[Op]:
        return [req.OPERATION for _c, req in self.requests]


class World:
    """Hypervisor + xenstored + toolstack + mini backend, and a way to start guests."""

    def __init__(self, hv: HypervisorThread | HypervisorProcess, xs_path: str, guest_xs_path: str,
                 backend: MiniBackend, toolstack: Toolstack) -> None:
        self.hv = hv
        self.xs_path = xs_path
        self.guest_xs_path = guest_xs_path
        self.backend = backend
        self.toolstack = toolstack

    def guest(
        self,
        *,
        response_timeout: float = 0.5,
        frame_done_timeout: float = 0.6,
        end_access_retry: float = 0.05,
    ) -> AbstractAsyncContextManager[SimGuest]:
        """A guest with short timeouts (Linux's 3 s would make the tests slow)."""
        return SimGuest.open(
            hypervisor_path=self.hv.socket_path, xenstore_path=self.guest_xs_path,
            domid=GUEST, response_timeout=response_timeout,
            frame_done_timeout=frame_done_timeout, end_access_retry=end_access_retry,
            remove_timeout=1.0,
        )


@asynccontextmanager
async def world(
    tmp_path: Path, hv: HypervisorThread | HypervisorProcess, spec: str = "connectors=c0:64x48"
) -> AsyncIterator[World]:
    async with running_xenstored(tmp_path, domains=(GUEST,)) as xsd:
        toolstack = Toolstack(xsd.xenstored, init_timeout=5)
        toolstack.create_domain(GUEST, "guest")
        async with open_xenstore(xsd.socket_path) as xs:
            with SimPlatform(hv.socket_path, xsd.socket_path) as platform:
                backend = MiniBackend(platform, xs, GUEST)
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(backend.run)
                        await toolstack.add_vdispl(GUEST, spec)
                        yield World(hv, xsd.socket_path, xsd.domain_sockets[GUEST], backend,
                                    toolstack)
                        nursery.cancel_scope.cancel()
                finally:
                    backend.close()


# ------------------------------------------------------------------------------------------
# handshake


async def test_guest_handshake_publishes_all_transports_in_one_go_and_connects(
    tmp_path: Path, hypervisor: HypervisorThread
) -> None:
    async with world(tmp_path, hypervisor, "connectors=a:64x48;b:32x16") as w:
        async with w.guest() as guest:
            await guest.wait_connected(timeout=5)
            assert guest.resolutions == [(64, 48), (32, 16)]
            assert guest.be_alloc is False
            assert w.backend.connections == 1
            assert len(w.backend.rings) == 2
            assert guest.stats.handshakes == 1
            # 1 (probe) → 3 → 4; the backend never saw the transports half-written.
            await w.backend.wait_for(lambda: len(w.backend.frontend_states) == 3)
            assert w.backend.frontend_states == [S.INITIALISING, S.INITIALISED, S.CONNECTED]
        # unload: 5, backend tears down and offers 2 again, guest 6
        assert guest.state is S.CLOSED
        assert w.backend.frontend_states[-2:] == [S.CLOSING, S.CLOSED]
        assert guest.pending_end_access == 0


async def test_guest_ignores_backend_states_it_has_no_business_with(
    tmp_path: Path, hypervisor: HypervisorThread
) -> None:
    async with world(tmp_path, hypervisor) as w, w.guest() as guest:
        await guest.wait_connected()
        for state in (S.CLOSING, S.RECONFIGURING, S.INITIALISED):
            await w.backend.set_state(state)
            await eventually(lambda: guest.backend_state is state)  # noqa: B023
            assert guest.state is S.CONNECTED
        await w.backend.set_state(S.CONNECTED)


# ------------------------------------------------------------------------------------------
# requests


async def test_guest_sends_linux_shaped_requests_and_flip_completes(
    tmp_path: Path, hypervisor: HypervisorThread
) -> None:
    async with world(tmp_path, hypervisor) as w, w.guest() as guest:
        await guest.wait_connected()
        buf = await guest.create_dumb(63, 48, 24)
        assert (buf.pitch, buf.size) == (189, 189 * 48)
        fb = await guest.add_fb(buf, 63, 48, PixelFormat.RGB888)
        draw_pattern(buf.buffer, width=63, height=48, pitch=189, fmt=PixelFormat.RGB888,
                     connector=0, frame=7)
        await guest.set_config(0, fb)
        assert await guest.page_flip(0, fb) is FlipOutcome.DONE
        await guest.set_config(0, None)
        await guest.rm_fb(fb)
        await guest.destroy_dumb(buf)

        be = w.backend
        assert be.ops() == [Op.DBUF_CREATE, Op.FB_ATTACH, Op.SET_CONFIG, Op.PG_FLIP,
                            Op.SET_CONFIG, Op.FB_DETACH, Op.DBUF_DESTROY]
        assert [req.id for _c, req in be.requests] == list(range(7))
        create = be.requests[0][1]
        assert isinstance(create, DbufCreateReq)
        assert (create.width, create.height, create.bpp, create.buffer_sz) == (
            63, 48, 24, 189 * 48)
        assert (create.flags, create.data_ofs) == (0, 0)
        assert create.dbuf_cookie == buf.cookie
        config = be.requests[2][1]
        assert isinstance(config, SetConfigReq)
        assert (config.fb_cookie, config.width, config.height, config.bpp) == (
            fb.cookie, 63, 48, 24)
        assert isinstance(be.requests[4][1], SetConfigReq) and be.requests[4][1].is_disable
        # the backend saw the guest's pixels through its own grant mapping
        _c, cookie, data = be.snapshots[-1]
        image = to_rgb(data, width=63, height=48, pitch=189, fourcc=PixelFormat.RGB888)
        assert image.rgb == pattern_rgb(63, 48, 0, 7).tobytes()
        stats = guest.connector_stats(0)
        assert (stats.flips_ok, stats.frame_done_timeouts, stats.events) == (1, 0, 1)


async def test_backend_error_status_reaches_the_caller_and_failed_flip_marks_connector(
    tmp_path: Path, hypervisor: HypervisorThread
) -> None:
    async with world(tmp_path, hypervisor) as w, w.guest() as guest:
        await guest.wait_connected()
        buf = await guest.create_dumb(16, 16, 32)
        fb = await guest.add_fb(buf, 16, 16)
        w.backend.policy = lambda c, r: errno.ENOENT if isinstance(r, PgFlipReq) else 0
        with pytest.raises(GuestRequestError) as info:
            await guest.page_flip(0, fb)
        assert info.value.errno == errno.ENOENT and info.value.op is Op.PG_FLIP
        stats = guest.connector_stats(0)
        assert (stats.flip_errors, stats.state) == (1, "error")
        await guest.destroy_dumb(buf)


async def test_response_timeout_fails_the_request_and_a_late_answer_is_ignored(
    tmp_path: Path, hypervisor: HypervisorThread
) -> None:
    async with world(tmp_path, hypervisor) as w, w.guest(response_timeout=0.1) as guest:
        await guest.wait_connected()
        buf = await guest.create_dumb(16, 16, 32)
        fb = await guest.add_fb(buf, 16, 16)
        w.backend.policy = lambda c, r: None if isinstance(r, SetConfigReq) else 0
        with pytest.raises(GuestRequestError) as info:
            await guest.set_config(0, fb)
        assert info.value.errno == errno.ETIMEDOUT
        assert guest.connector_stats(0).response_timeouts == 1
        # the next request still goes out; the late answer (old id) is then ignored
        w.backend.policy = answer_all
        await guest.rm_fb(fb)
        w.backend.answer_late()
        await eventually(lambda: guest.connector_stats(0).responses_ignored == 1)
        await guest.destroy_dumb(buf)
        assert w.backend.ops()[-1] is Op.DBUF_DESTROY


async def test_response_with_right_id_but_wrong_operation_is_not_an_answer(
    tmp_path: Path, hypervisor: HypervisorThread
) -> None:
    async with world(tmp_path, hypervisor) as w, w.guest(response_timeout=0.1) as guest:
        await guest.wait_connected()

        def wrong_op(connector: int, req: Request) -> int | None:
            rsp = Response(id=req.id, operation=Op.PG_FLIP, status=0)
            ring = w.backend.rings[connector]
            ring.put_response(rsp.pack())
            ring.push_responses()
            w.backend.evtchn.notify(next(iter(w.backend.req_ports)))
            return None

        w.backend.policy = wrong_op
        with pytest.raises(GuestRequestError) as info:
            await guest.set_config(0, None)
        assert info.value.errno == errno.ETIMEDOUT
        assert guest.connector_stats(0).responses_ignored == 1
        w.backend.unanswered.clear()


async def test_missing_flip_event_is_a_frame_done_timeout(
    tmp_path: Path, hypervisor: HypervisorThread
) -> None:
    async with world(tmp_path, hypervisor) as w, w.guest(frame_done_timeout=0.15) as guest:
        await guest.wait_connected()
        buf = await guest.create_dumb(16, 16, 32)
        fb = await guest.add_fb(buf, 16, 16)
        await guest.set_config(0, fb)
        w.backend.send_flip_events = False
        assert await guest.page_flip(0, fb) is FlipOutcome.FRAME_DONE_TIMEOUT
        w.backend.send_flip_events = True
        assert await guest.page_flip(0, fb) is FlipOutcome.DONE
        stats = guest.connector_stats(0)
        assert (stats.frame_done_timeouts, stats.flips_ok) == (1, 1)
        await guest.destroy_dumb(buf)


async def test_event_with_wrong_id_is_skipped_like_linux(
    tmp_path: Path, hypervisor: HypervisorThread
) -> None:
    async with world(tmp_path, hypervisor) as w, w.guest(frame_done_timeout=0.15) as guest:
        await guest.wait_connected()
        producer = w.backend.producers[0]
        producer._next_id = 5  # a backend that numbers events wrongly
        assert producer.put_pg_flip(1)
        w.backend.evtchn.notify(w.backend.evt_ports[0])
        await eventually(lambda: guest.connector_stats(0).events_skipped == 1)
        assert guest.connector_stats(0).events == 0


async def test_get_edid_returns_what_the_backend_wrote(
    tmp_path: Path, hypervisor: HypervisorThread
) -> None:
    async with world(tmp_path, hypervisor) as w, w.guest() as guest:
        await guest.wait_connected()
        assert await guest.get_edid(0) == w.backend.edid
        req = w.backend.requests[-1][1]
        assert isinstance(req, GetEdidReq) and req.buffer_sz == 32768


async def test_import_prime_sends_the_pending_buffer_form(
    tmp_path: Path, hypervisor: HypervisorThread
) -> None:
    async with world(tmp_path, hypervisor) as w, w.guest() as guest:
        await guest.wait_connected()
        buf = await guest.import_prime(3 * PAGE_SIZE + 10, data_ofs=128)
        req = w.backend.requests[-1][1]
        assert isinstance(req, DbufCreateReq)
        assert (req.width, req.height, req.bpp, req.buffer_sz, req.data_ofs) == (
            0, 0, 0, 3 * PAGE_SIZE + 10, 128)
        assert len(buf.buffer) == 4 * PAGE_SIZE
        await guest.destroy_dumb(buf)


# ------------------------------------------------------------------------------------------
# recovery


async def test_backend_closed_makes_guest_reset_and_rehandshake(
    tmp_path: Path, hypervisor: HypervisorThread
) -> None:
    async with world(tmp_path, hypervisor) as w, w.guest() as guest:
        await guest.wait_connected()
        buf = await guest.create_dumb(16, 16, 32)
        w.backend.teardown()
        await w.backend.set_state(S.CLOSED)
        await guest.wait_state(lambda g: g.state is S.INITIALISING)
        assert buf.freed and not guest.connected
        assert guest.stats.disconnects == 1
        await w.backend.set_state(S.INIT_WAIT)
        await guest.wait_connected()
        assert (guest.stats.handshakes, guest.stats.disconnects) == (2, 1)
        assert w.backend.connections == 2
        # ids start from 0 again on the new connection
        await guest.set_config(0, None)
        assert w.backend.requests[-1][1].id == 0
        assert guest.stats.end_access_deferred == 0


async def test_grants_still_mapped_by_backend_are_retried_until_released(
    tmp_path: Path, hypervisor: HypervisorThread
) -> None:
    async with world(tmp_path, hypervisor) as w, w.guest(end_access_retry=0.02) as guest:
        await guest.wait_connected()
        await guest.create_dumb(16, 16, 32)
        # A sloppy backend closes without unmapping anything first.
        w.backend.reinit_after_close = False
        w.backend._scope.cancel()  # type: ignore[union-attr]
        await w.backend.set_state(S.CLOSED)
        await guest.wait_state(lambda g: g.state is S.INITIALISING)
        assert guest.pending_end_access == 3  # ring page, event page, buffer page
        await guest.wait_state(lambda g: g.stats.end_access_retries >= 3)
        w.backend.teardown()
        await guest.wait_state(lambda g: g.pending_end_access == 0)
        assert guest.stats.end_access_deferred == 3
        await w.backend.set_state(S.INIT_WAIT)
        await guest.wait_connected()


async def test_backend_initialising_while_connected_tears_down_then_waits(
    tmp_path: Path, hypervisor: HypervisorThread
) -> None:
    async with world(tmp_path, hypervisor) as w, w.guest() as guest:
        await guest.wait_connected()
        w.backend.teardown()
        await w.backend.set_state(S.INITIALISING)
        await guest.wait_state(lambda g: g.state is S.INITIALISING)
        assert not guest.connected
        with pytest.raises(GuestRequestError) as info:
            await guest.set_config(0, None)
        assert info.value.errno == errno.EIO
        await w.backend.set_state(S.INIT_WAIT)
        await guest.wait_connected()


async def test_backend_closing_before_connected_is_ignored_like_linux(
    tmp_path: Path, hypervisor: HypervisorThread
) -> None:
    async with world(tmp_path, hypervisor) as w:
        published = trio.Event()
        w.backend.reinit_after_close = False

        async with w.guest() as guest:
            guest.on_published = lambda g: published.set()
            await guest.wait_state(lambda g: g.state in (S.INITIALISED, S.CONNECTED))
            await guest.wait_connected()
            # After a clean reset, a backend that closes during the next handshake (guest 3)
            # finds the guest staying at 3 with its channels (Linux has no DRM device yet).
            w.backend.teardown()
            w.backend.state = S.CLOSED
            await w.backend.xs.write(f"{w.backend.be}/state", b"6")
            await guest.wait_state(lambda g: g.state is S.INITIALISING)
            await w.backend.xs.write(f"{w.backend.be}/state", b"2")
            await guest.wait_state(lambda g: g.state is S.INITIALISED)
            assert published.is_set()
            await w.backend.xs.write(f"{w.backend.be}/state", b"6")
            await guest.wait_state(lambda g: g.backend_state is S.CLOSED)
            # A barrier: the guest's watch handles one change at a time, and ignores Closing.
            await w.backend.xs.write(f"{w.backend.be}/state", b"5")
            await guest.wait_state(lambda g: g.backend_state is S.CLOSING)
            assert guest.state is S.INITIALISED and guest.stats.disconnects == 1
            # the backend can still connect to the published rings
            w.backend.state = S.INIT_WAIT
            await w.backend.connect()
            await guest.wait_connected()


async def test_crash_leaves_nothing_once_the_backend_lets_go(
    tmp_path: Path, hypervisor: HypervisorThread
) -> None:
    async with world(tmp_path, hypervisor) as w:
        async with w.guest() as guest:
            await guest.wait_connected()
            buf = await guest.create_dumb(32, 32, 32)
            await guest.add_fb(buf, 32, 32)
            guest.crash()
            assert not guest.connected
            with pytest.raises(GuestRequestError):
                await guest.create_dumb(8, 8, 32)
        assert guest.state is S.CONNECTED  # a crashed guest writes nothing
        w.backend.teardown()


# ------------------------------------------------------------------------------------------
# be-alloc


async def test_be_alloc_buffer_is_backend_memory_mapped_by_the_guest(
    tmp_path: Path, hypervisor: HypervisorThread
) -> None:
    spec = "be-alloc=1,connectors=c0:64x48"
    async with world(tmp_path, hypervisor, spec) as w, w.guest() as guest:
        await guest.wait_connected()
        assert guest.be_alloc
        buf = await guest.create_dumb(64, 48, 16)
        req = w.backend.requests[-1][1]
        assert isinstance(req, DbufCreateReq) and req.be_alloc
        assert len(buf.backend_refs) == pages_for(64 * 48 * 2)
        fb = await guest.add_fb(buf, 64, 48, PixelFormat.RGB565)
        draw_pattern(buf.buffer, width=64, height=48, pitch=128, fmt=PixelFormat.RGB565,
                     connector=0, frame=3)
        seen = to_rgb(w.backend.pixels(fb.cookie), width=64, height=48, pitch=128,
                      fourcc=PixelFormat.RGB565)
        assert seen.rgb == pattern_rgb(64, 48, 0, 3).tobytes()
        await guest.rm_fb(fb)
        await guest.destroy_dumb(buf)
        assert buf.cookie not in w.backend.buffers
        assert guest.stats.end_access_deferred == 0


# ------------------------------------------------------------------------------------------
# misbehaviour hooks


async def test_request_hook_rewrites_bytes_on_the_wire(
    tmp_path: Path, hypervisor: HypervisorThread
) -> None:
    async with world(tmp_path, hypervisor) as w, w.guest() as guest:
        await guest.wait_connected()

        def forge(raw: bytes) -> bytes:
            return raw[:8] + (0xDEAD).to_bytes(8, "little") + raw[16:]

        guest.hostile.set_request_hook(Op.FB_DETACH, forge)
        buf = await guest.create_dumb(8, 8, 32)
        fb = await guest.add_fb(buf, 8, 8)
        await guest.rm_fb(fb)
        req = w.backend.requests[-1][1]
        assert req.OPERATION is Op.FB_DETACH and req.fb_cookie == 0xDEAD  # type: ignore[union-attr]
        await guest.destroy_dumb(buf)


async def test_scribbled_ring_index_is_seen_by_the_backend_as_overflow(
    tmp_path: Path, hypervisor: HypervisorThread
) -> None:
    async with world(tmp_path, hypervisor) as w, w.guest() as guest:
        await guest.wait_connected()
        ring = w.backend.rings[0]
        w.backend._scope.cancel()  # type: ignore[union-attr]
        guest.hostile.scribble_ring(0, "req_prod", 1000)
        with pytest.raises(ProtocolError, match="overflow"):
            ring.take_requests()
        guest.hostile.scribble_event_page(0, "in_cons", 500)
        with pytest.raises(ProtocolError):
            w.backend.producers[0].put_pg_flip(1)


async def test_scribbled_directory_is_refused_by_a_careful_reader(
    tmp_path: Path, hypervisor: HypervisorThread
) -> None:
    async with world(tmp_path, hypervisor) as w, w.guest() as guest:
        await guest.wait_connected()
        buf = await guest.create_dumb(8, 8, 32)
        guest.hostile.scribble_directory(buf, 0, 0, (77).to_bytes(4, "little"))
        with pytest.raises(ProtocolError):
            w.backend.read_directory(buf.dir_grefs[0], buf.npages)
        await guest.destroy_dumb(buf)


# ------------------------------------------------------------------------------------------
# drawing mode


@pytest.mark.parametrize("fmt", [PixelFormat.XRGB8888, PixelFormat.RGB565, PixelFormat.YUYV])
async def test_drawing_mode_flips_a_recognisable_moving_pattern(
    tmp_path: Path, hypervisor: HypervisorThread, fmt: PixelFormat
) -> None:
    spec = "connectors=a:96x64;b:48x32"
    async with world(tmp_path, hypervisor, spec) as w, w.guest() as guest:
        await guest.wait_connected()
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: guest.draw(0, fps=200, fmt=fmt, frames=6))
                nursery.start_soon(lambda: guest.draw(1, fps=200, fmt=fmt, frames=4))
        for connector, (width, height), frames in ((0, (96, 64), 6), (1, (48, 32), 4)):
            stats = guest.connector_stats(connector)
            assert (stats.frames_drawn, stats.flips_ok) == (frames, frames - 1)
            ops = [r.OPERATION for c, r in w.backend.requests if c == connector]
            assert ops.count(Op.SET_CONFIG) == 2  # enable once, disable at the end
            shots = [s for s in w.backend.snapshots if s[0] == connector]
            decoded = [
                decode_pattern(np_image(to_rgb(data, width=width, height=height,
                                               pitch=width * fmt.cpp, fourcc=fmt)))
                for _c, _cookie, data in shots
            ]
            assert decoded[:frames] == [(connector, n) for n in range(frames)]
        assert not w.backend.buffers  # all destroyed after drawing


def np_image(image: RgbImage) -> npt.NDArray[np.uint8]:
    return np.frombuffer(image.rgb, dtype=np.uint8).reshape(image.height, image.width, 3)


async def test_unloading_while_drawing_releases_everything(
    tmp_path: Path, hypervisor: HypervisorThread
) -> None:
    async with world(tmp_path, hypervisor) as w:
        async with w.guest() as guest:
            await guest.wait_connected()
            guest.start_drawing(fps=100)
            await eventually(lambda: guest.connector_stats(0).flips_ok >= 3)
        assert guest.state is S.CLOSED
        assert guest.connector_stats(0).flip_errors == 0
        assert not w.backend.mappings and not w.backend.buffers
