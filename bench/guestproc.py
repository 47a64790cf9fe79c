"""Benchmark guests in their own processes: pre-drawn double buffers, flipped on command.

The process that measures the backend must hold only the backend, the virtual display and
xenstored, so each guest runs in a child made with ``multiprocessing`` (spawn), as
``tests/sim/test_guest_xproc.py`` does. A guest connects, gives every connector two buffers
at its resolution, draws the test pattern into both once, shows the first with SET_CONFIG
and then waits for commands on a pipe:

``("flip", count, record)``
    flip every connector, alternating its two buffers, ``count`` times each (``None``: until
    ``stop``). Each connector issues its next PG_FLIP as soon as EVT_PG_FLIP of the previous
    one arrived — paced by the output's vblanks, as a compositor driven by page-flip events
    is — so a 60 Hz output is flipped at 60 fps. With ``record`` every flip's send and
    completion times (``time.perf_counter``, i.e. ``CLOCK_MONOTONIC``, comparable across
    processes) are kept. With a count, the reply comes when all are done.
``("churn", width, height)``
    on every connector, until ``stop``: create a ``width``×``height`` buffer, attach it,
    flip it, detach it, destroy it — a hostile guest making Dom0 map, export or copy and
    release its largest buffers as fast as it is answered. Replies ``("churning", None)``.
``("stats",)``
    the guest's counters now, while flipping goes on.
``("stop",)``
    stop flipping (each connector finishes its flip in flight) and reply with the results.
``("quit",)``
    disable, detach and destroy everything, unload the driver, reply ``("bye", state)``.

Replies are ``(kind, payload)`` tuples; a failure in the child is sent as ``("error", text)``.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import trio

from displback.protocol.constants import PixelFormat
from displback.sim.guest import FlipOutcome, GuestBuffer, GuestFb, SimGuest
from displback.sim.guest_pattern import draw_pattern

__all__ = ["FlipLog", "GuestHost", "GuestProcess", "guest_main"]

XRGB = PixelFormat.XRGB8888


@dataclass
class FlipLog:
    """What one connector did during a ``flip`` command."""

    connector: int
    flips: int = 0
    not_done: int = 0  # flips that ended in a frame-done timeout or release
    times: list[tuple[float, float]] = field(default_factory=list)  # (sent, completed)


@dataclass
class _Screen:
    index: int
    buffers: list[GuestBuffer]
    fbs: list[GuestFb]
    shown: int = 0


async def _prepare(guest: SimGuest, index: int) -> _Screen:
    width, height = guest.resolutions[index]
    buffers: list[GuestBuffer] = []
    fbs: list[GuestFb] = []
    for frame in range(2):
        buf = await guest.create_dumb(width, height, XRGB.bpp)
        buffers.append(buf)
        draw_pattern(buf.buffer, width=width, height=height, pitch=buf.pitch, fmt=XRGB,
                     connector=index, frame=frame)
        fbs.append(await guest.add_fb(buf, width, height, XRGB))
    await guest.set_config(index, fbs[0])
    return _Screen(index, buffers, fbs)


async def _release(guest: SimGuest, screen: _Screen) -> None:
    await guest.set_config(screen.index, None)
    for fb in screen.fbs:
        await guest.rm_fb(fb)
    for buf in screen.buffers:
        await guest.destroy_dumb(buf)


async def _flip(
    guest: SimGuest, screen: _Screen, log: FlipLog, count: int | None, record: bool,
    stop: trio.Event,
) -> None:
    while (count is None or log.flips < count) and not stop.is_set():
        fb = screen.fbs[(screen.shown + 1) % 2]
        sent = time.perf_counter()
        result = await guest.page_flip(screen.index, fb)
        done = time.perf_counter()
        screen.shown += 1
        log.flips += 1
        if result is not FlipOutcome.DONE:
            log.not_done += 1
        if record:
            log.times.append((sent, done))


async def _churn(
    guest: SimGuest, screen: _Screen, log: FlipLog, size: tuple[int, int], stop: trio.Event
) -> None:
    width, height = size
    while not stop.is_set():
        buf = await guest.create_dumb(width, height, XRGB.bpp)
        try:
            fb = await guest.add_fb(buf, width, height, XRGB)
            await guest.page_flip(screen.index, fb)
            await guest.rm_fb(fb)
        finally:
            await guest.destroy_dumb(buf)
        log.flips += 1


def _stats(guest: SimGuest, screens: list[_Screen]) -> list[dict[str, int]]:
    out = []
    for screen in screens:
        s = guest.connector_stats(screen.index)
        out.append({
            "flips_ok": s.flips_ok,
            "frame_done_timeouts": s.frame_done_timeouts,
            "flip_errors": s.flip_errors,
            "response_timeouts": s.response_timeouts,
        })
    return out


Reply = Callable[[tuple[str, Any]], None]


async def _serve(
    hv_path: str, xs_path: str, domid: int, inbox: trio.MemoryReceiveChannel[tuple[Any, ...]],
    reply: Reply, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """One guest domain: connect, prepare its screens (then it is started), then obey its
    commands."""
    async with SimGuest.open(
        hypervisor_path=hv_path, xenstore_path=xs_path, domid=domid,
        response_timeout=3.0, frame_done_timeout=3.1, end_access_retry=0.05,
    ) as guest:
        await guest.wait_connected(timeout=30)
        screens = [await _prepare(guest, i) for i in range(len(guest.resolutions))]
        reply(("ready", [tuple(r) for r in guest.resolutions]))
        task_status.started()
        logs: list[FlipLog] = []
        stop = trio.Event()
        flipping: trio.Nursery | None = None
        async with trio.open_nursery() as nursery:
            while True:
                command = await inbox.receive()
                kind = command[0]
                if kind == "flip":
                    _, count, record = command
                    logs = [FlipLog(s.index) for s in screens]
                    stop = trio.Event()
                    if count is not None:
                        async with trio.open_nursery() as inner:
                            for screen, log in zip(screens, logs, strict=True):
                                inner.start_soon(_flip, guest, screen, log, count, record, stop)
                        reply(("flipped", logs))
                    else:
                        flipping = await nursery.start(_flip_all, guest, screens, logs, record,
                                                       stop)
                        reply(("flipping", None))
                elif kind == "churn":
                    _, width, height = command
                    logs = [FlipLog(s.index) for s in screens]
                    stop = trio.Event()
                    flipping = await nursery.start(
                        _churn_all, guest, screens, logs, (width, height), stop)
                    reply(("churning", None))
                elif kind == "stats":
                    reply(("stats", _stats(guest, screens)))
                elif kind == "stop":
                    stop.set()
                    if flipping is not None:
                        await _wait_done(flipping)
                        flipping = None
                    reply(("stopped", logs))
                elif kind == "quit":
                    stop.set()
                    if flipping is not None:
                        await _wait_done(flipping)
                    break
                else:
                    reply(("error", f"unknown command {kind!r}"))
            nursery.cancel_scope.cancel()
        final = _stats(guest, screens)
        for screen in screens:
            await _release(guest, screen)
    reply(("bye", {"state": int(guest.state), "stats": final}))


async def _flip_all(
    guest: SimGuest, screens: list[_Screen], logs: list[FlipLog], record: bool,
    stop: trio.Event, *, task_status: Any,
) -> None:
    async with trio.open_nursery() as nursery:
        task_status.started(nursery)
        for screen, log in zip(screens, logs, strict=True):
            nursery.start_soon(_flip, guest, screen, log, None, record, stop)


async def _churn_all(
    guest: SimGuest, screens: list[_Screen], logs: list[FlipLog], size: tuple[int, int],
    stop: trio.Event, *, task_status: Any,
) -> None:
    async with trio.open_nursery() as nursery:
        task_status.started(nursery)
        for screen, log in zip(screens, logs, strict=True):
            nursery.start_soon(_churn, guest, screen, log, size, stop)


async def _wait_done(nursery: trio.Nursery) -> None:
    while nursery.child_tasks:
        await trio.sleep(0.005)


async def _host(hv_path: str, conn: Connection) -> None:
    """Guests of one process, side by side on one trio loop: ``(domid, "add", xs_path)``
    starts one (replying ``ready`` when it shows its frames), ``(domid, *command)`` goes to
    it, ``(0, "exit")`` ends the process once
    every guest has quit."""
    inboxes: dict[int, trio.MemorySendChannel[tuple[Any, ...]]] = {}

    async def guest(domid: int, xs_path: str,
                    inbox: trio.MemoryReceiveChannel[tuple[Any, ...]], *,
                    task_status: trio.TaskStatus[None]) -> None:
        try:
            await _serve(hv_path, xs_path, domid, inbox, conn.send, task_status=task_status)
        finally:
            del inboxes[domid]

    async with trio.open_nursery() as nursery:
        while True:
            domid, kind, *args = await trio.to_thread.run_sync(conn.recv,
                                                               abandon_on_cancel=True)
            if kind == "exit":
                break
            if kind == "add":
                send, receive = trio.open_memory_channel[tuple[Any, ...]](1)
                inboxes[domid] = send
                # One at a time: the ready replies come in the order of the adds.
                await nursery.start(guest, domid, args[0], receive)
            elif domid in inboxes:
                await inboxes[domid].send((kind, *args))
            else:
                conn.send(("error", f"no guest {domid} in this process"))


def guest_main(hv_path: str, conn: Connection) -> None:
    """The child process: run its guests; report an exception instead of dying silently."""
    try:
        with contextlib.suppress(PermissionError, AttributeError):  # not Linux: as it is
            # SCHED_BATCH: a guest woken by the backend's notification does not preempt the
            # backend in the middle of its loop (on Xen a guest runs on its own vCPUs); its
            # share of the CPU is unchanged.
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        trio.run(_host, hv_path, conn)
    except BaseException:
        with contextlib.suppress(OSError):
            conn.send(("error", traceback.format_exc()))
        raise


class GuestError(RuntimeError):
    """The guest process failed or did not answer."""


class GuestHost:
    """One child process holding guests of several domains on one trio loop.

    Guests in one process share its wake-ups: events the backend sends to several of them
    at one vblank are read in one loop pass, so a benchmark with many guests spends less of
    the machine's CPU on the guests and more of what it measures is the backend's. The
    parent sends one command at a time (:attr:`lock`) and reads its one reply.
    """

    def __init__(self, hv_path: str, *, timeout: float = 60.0) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.timeout = timeout
        self.lock = trio.Lock()
        self.domids: set[int] = set()
        self._conn, theirs = ctx.Pipe()
        self._proc: BaseProcess = ctx.Process(
            target=guest_main, args=(hv_path, theirs), daemon=True, name="bench-guests",
        )
        self._proc.start()
        theirs.close()

    @property
    def pid(self) -> int:
        pid = self._proc.pid
        assert pid is not None  # started in __init__
        return pid

    async def command(
        self, domid: int, command: tuple[Any, ...], expected: str, timeout: float | None = None,
    ) -> Any:
        """Send ``command`` to guest ``domid`` and return the payload of its reply."""
        async with self.lock:
            self._conn.send((domid, *command))
            limit = self.timeout if timeout is None else timeout
            ready = await trio.to_thread.run_sync(self._conn.poll, limit,
                                                  abandon_on_cancel=True)
            if not ready:
                raise GuestError(f"guest {domid} did not answer within {limit} s")
            try:
                kind, payload = self._conn.recv()
            except EOFError:
                raise GuestError(f"guest {domid}: its process ended") from None
        if kind == "error":
            raise GuestError(f"guest {domid}: {payload}")
        if kind != expected:
            raise GuestError(f"guest {domid}: expected {expected!r}, got {kind!r}")
        return payload

    def add(self, xs_path: str, domid: int) -> GuestProcess:
        """Start guest ``domid`` in this process (await its :meth:`GuestProcess.ready`)."""
        self._conn.send((domid, "add", xs_path))
        self.domids.add(domid)
        return GuestProcess(self, domid)

    def release(self, domid: int) -> None:
        """Guest ``domid`` quit (or failed); the process ends with its last guest."""
        self.domids.discard(domid)
        if self.domids:
            return
        if self._proc.is_alive():
            with contextlib.suppress(OSError):
                self._conn.send((0, "exit"))
            self._proc.join(5)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        self._conn.close()


class GuestProcess:
    """The parent's handle of one benchmark guest (call from trio); its process may hold
    other guests too (:class:`GuestHost`)."""

    def __init__(self, host: GuestHost, domid: int) -> None:
        self.host = host
        self.domid = domid
        self.resolutions: list[tuple[int, int]] = []

    @classmethod
    def alone(cls, hv_path: str, xs_path: str, domid: int) -> GuestProcess:
        """A guest in a process of its own."""
        return GuestHost(hv_path).add(xs_path, domid)

    @property
    def pid(self) -> int:
        return self.host.pid

    async def _call(self, command: tuple[Any, ...], expected: str) -> Any:
        return await self.host.command(self.domid, command, expected)

    async def ready(self) -> list[tuple[int, int]]:
        """Wait until the guest is connected and shows its first frames."""
        async with self.host.lock:
            limit = self.host.timeout
            ok = await trio.to_thread.run_sync(self.host._conn.poll, limit,
                                               abandon_on_cancel=True)
            if not ok:
                raise GuestError(f"guest {self.domid} did not answer within {limit} s")
            try:
                kind, payload = self.host._conn.recv()
            except EOFError:
                raise GuestError(f"guest {self.domid}: its process ended") from None
        if kind != "ready":
            raise GuestError(f"guest {self.domid}: expected 'ready', got {kind!r}: {payload}")
        self.resolutions = [(int(w), int(h)) for w, h in payload]
        return self.resolutions

    async def flip(self, count: int, *, record: bool = False) -> list[FlipLog]:
        """Flip every connector ``count`` times; the logs."""
        logs: list[FlipLog] = await self._call(("flip", count, record), "flipped")
        return logs

    async def start_flipping(self, *, record: bool = False) -> None:
        await self._call(("flip", None, record), "flipping")

    async def start_churning(self, width: int, height: int) -> None:
        """Create, attach, flip, detach and destroy ``width``×``height`` buffers on every
        connector until :meth:`stop` (whose logs count the rounds as ``flips``)."""
        await self._call(("churn", width, height), "churning")

    async def stats(self) -> list[dict[str, int]]:
        stats: list[dict[str, int]] = await self._call(("stats",), "stats")
        return stats

    async def stop(self) -> list[FlipLog]:
        logs: list[FlipLog] = await self._call(("stop",), "stopped")
        return logs

    async def quit(self) -> dict[str, Any]:
        """Release everything and unload; the final counters."""
        bye: dict[str, Any] = await self._call(("quit",), "bye")
        return bye

    def kill(self) -> None:
        """Forget this guest; end the process if it was the last one in it (after a failure
        too)."""
        self.host.release(self.domid)
