"""One connection to a Wayland compositor, driven by trio on the display's fd: no thread.

libwayland queues requests in memory and reads events only when asked, so the connection
fits trio's loop as it is: :meth:`WaylandConnection.pump` waits until the fd is readable
(``trio.lowlevel.wait_readable``), then ``wl_display_dispatch`` reads what is there (the
fd is readable, so its ``poll`` returns at once) and runs the handlers, in this task.
Requests made from other tasks (a flip from a connector's task) are sent by :meth:`flush`
right away; when the socket is full (``EAGAIN``) the pump waits for it to drain.
Connecting is a local socket ``connect``; the two round trips that follow (the globals,
then what they announce: shm formats, output names, seat capabilities) are awaited on
the same fd with a time limit, never with libwayland's blocking ``wl_display_roundtrip``,
so a compositor that does not answer cannot stall the daemon's event loop.

What we bind: ``wl_compositor``, ``wl_shm`` (and its formats), ``xdg_wm_base`` (answering
its pings), every ``wl_output`` with its name (``zxdg_output_manager_v1``: weston 10's
``wl_output`` is version 3, without names), every ``wl_seat``, and whether
``zwp_linux_dmabuf_v1`` is offered. Everything a window or a seat needs is reached from
here; when the connection ends (:meth:`close`, or the compositor went away) every proxy
made on it is dead, and :attr:`generation` tells objects of a new connection from old ones.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
from collections.abc import Callable
from typing import Any

import trio
from pywayland import ffi, lib
from pywayland.client.display import Display
from pywayland.protocol.wayland import WlCompositor, WlOutput, WlSeat, WlShm
from pywayland.protocol.xdg_output_unstable_v1 import ZxdgOutputManagerV1
from pywayland.protocol.xdg_shell import XdgWmBase

__all__ = ["ConnectionLost", "WaylandConnection", "shm_format"]

#: DRM fourccs and wl_shm formats are the same numbers, but for the two every compositor
#: must support, which wl_shm numbers 0 and 1.
_DRM_ARGB8888 = 0x34325241
_DRM_XRGB8888 = 0x34325258
_REQUIRED_SHM = frozenset({_DRM_ARGB8888, _DRM_XRGB8888})

_generations = itertools.count(1)


def _errno() -> int:
    """errno of the last libwayland call (cffi keeps it per thread)."""
    return int(ffi.errno)  # type: ignore[attr-defined]


def shm_format(fourcc: int) -> int:
    """The ``wl_shm`` format number of a DRM fourcc."""
    return {_DRM_ARGB8888: 0, _DRM_XRGB8888: 1}.get(fourcc, fourcc)


def _drm_fourcc(shm: int) -> int:
    return {0: _DRM_ARGB8888, 1: _DRM_XRGB8888}.get(shm, shm)


class ConnectionLost(Exception):
    """The compositor closed the connection, killed it with a protocol error, or did not
    answer in time."""


class WaylandConnection:
    """A connected compositor and the globals we use; open with :meth:`connect`."""

    def __init__(self, display: Display, name: str) -> None:
        self.display = display
        self.name = name
        self.generation = next(_generations)
        self.closed = False
        self.globals: dict[int, tuple[str, int]] = {}
        self.compositor: Any = None
        self.compositor_version = 0
        self.shm: Any = None
        self.wm_base: Any = None
        self.dmabuf_offered = False
        #: Formats ``wl_shm`` announced, as DRM fourccs (ARGB/XRGB8888 are always there).
        self.shm_formats: set[int] = set(_REQUIRED_SHM)
        #: Outputs by name (the xdg-output name, e.g. ``HDMI-A-1``, weston's ``headless``).
        self.outputs: dict[str, Any] = {}
        self.seats: list[Any] = []
        self._xdg_outputs: list[Any] = []
        self._can_write = trio.Event()
        self._flush_blocked = False
        #: Called for each seat bound (the display routes it).
        self.on_seat: Callable[[Any], None] | None = None

    @classmethod
    async def connect(
        cls,
        name: str,
        *,
        timeout: float = 5.0,
        on_seat: Callable[[Any], None] | None = None,
    ) -> WaylandConnection:
        """Connect to the compositor's socket ``name`` (a name in ``$XDG_RUNTIME_DIR`` or an
        absolute path) and bind the globals; :class:`ConnectionLost` if it cannot."""
        display = Display(name)
        try:
            display.connect()
        except ValueError:
            err = _errno()
            raise ConnectionLost(
                f"cannot connect to Wayland display {name!r}: {errno.errorcode.get(err, err)}"
            ) from None
        conn = cls(display, name)
        conn.on_seat = on_seat
        try:
            with trio.fail_after(timeout):
                await conn._bind_globals()
        except trio.TooSlowError:
            conn.close()
            raise ConnectionLost(
                f"{name}: no answer from the compositor in {timeout:g} s"
            ) from None
        except BaseException:
            conn.close()
            raise
        return conn

    async def _bind_globals(self) -> None:
        registry = self.display.get_registry()
        registry.dispatcher["global"] = self._on_global
        registry.dispatcher["global_remove"] = self._on_global_remove
        self._registry = registry
        await self.roundtrip()
        by_interface: dict[str, list[tuple[int, int]]] = {}
        for gname, (interface, version) in sorted(self.globals.items()):
            by_interface.setdefault(interface, []).append((gname, version))

        def first(interface: str) -> tuple[int, int]:
            found = by_interface.get(interface)
            if not found:
                raise ConnectionLost(f"{self.name}: the compositor offers no {interface}")
            return found[0]

        gname, version = first("wl_compositor")
        self.compositor_version = min(version, 4)
        self.compositor = registry.bind(gname, WlCompositor, self.compositor_version)
        gname, _ = first("wl_shm")
        self.shm = registry.bind(gname, WlShm, 1)
        self.shm.dispatcher["format"] = self._on_shm_format
        gname, _ = first("xdg_wm_base")
        self.wm_base = registry.bind(gname, XdgWmBase, 1)
        self.wm_base.dispatcher["ping"] = self._on_ping
        self.dmabuf_offered = "zwp_linux_dmabuf_v1" in by_interface
        manager = None
        if "zxdg_output_manager_v1" in by_interface:
            mname, mversion = by_interface["zxdg_output_manager_v1"][0]
            manager = registry.bind(mname, ZxdgOutputManagerV1, min(mversion, 2))
        for gname, version in by_interface.get("wl_output", []):
            self._bind_output(registry, manager, gname, min(version, 3))
        for gname, version in by_interface.get("wl_seat", []):
            seat = registry.bind(gname, WlSeat, min(version, 5))
            seat.user_data = min(version, 5)  # the seat router releases devices from v3 on
            self.seats.append(seat)
            if self.on_seat is not None:
                self.on_seat(seat)
        await self.roundtrip()
        if manager is not None:
            manager.destroy()

    def _bind_output(self, registry: Any, manager: Any, gname: int, version: int) -> None:
        output = registry.bind(gname, WlOutput, version)
        if manager is None:
            self.outputs[f"wl_output-{gname}"] = output
            return
        xdg = manager.get_xdg_output(output)
        self._xdg_outputs.append(xdg)

        def on_name(_proxy: Any, name: str) -> None:
            self.outputs[name] = output

        xdg.dispatcher["name"] = on_name

    def _on_global(self, _registry: Any, name: int, interface: str, version: int) -> None:
        self.globals[name] = (interface, version)

    def _on_global_remove(self, _registry: Any, name: int) -> None:
        self.globals.pop(name, None)

    def _on_shm_format(self, _shm: Any, fmt: int) -> None:
        self.shm_formats.add(_drm_fourcc(fmt))

    def _on_ping(self, wm_base: Any, serial: int) -> None:
        wm_base.pong(serial)
        self.flush()

    # -- the fd ------------------------------------------------------------------------------

    async def roundtrip(self) -> None:
        """Wait until the compositor has handled every request sent so far (pumping events)."""
        done = trio.Event()
        callback = self.display.sync()
        callback.dispatcher["done"] = lambda _cb, _data: done.set()
        self.flush()
        while not done.is_set():
            await self._read_once()

    async def pump(self) -> None:
        """Read and dispatch events until the connection ends (:class:`ConnectionLost`)."""
        lost: ConnectionLost | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._drain_writes)
            try:
                while True:
                    await self._read_once()
            except ConnectionLost as exc:
                lost = exc
                nursery.cancel_scope.cancel()
        raise lost if lost is not None else ConnectionLost(f"{self.name}: closed")

    async def _read_once(self) -> None:
        """Wait until the fd is readable, read what is there, run the handlers.

        libwayland's own ``wl_display_dispatch`` would first flush, and on a full socket
        wait in ``poll`` for the compositor to read — blocking the whole event loop if it
        never does — so its parts are called here, after trio's wait and with no await
        between them: prepare, read (``MSG_DONTWAIT``: it does not block), dispatch.
        Flushing is :meth:`flush`'s, which never blocks either."""
        if self.closed:
            raise ConnectionLost(f"{self.name}: closed")
        try:
            await trio.lowlevel.wait_readable(self.display.get_fd())
        except trio.ClosedResourceError:
            raise ConnectionLost(f"{self.name}: closed") from None
        ptr = self.display._ptr
        if self.closed or ptr is None:
            raise ConnectionLost(f"{self.name}: closed")
        while lib.wl_display_prepare_read(ptr) != 0:  # events already queued: run them
            if lib.wl_display_dispatch_pending(ptr) < 0:
                raise ConnectionLost(f"{self.name}: {self._error_text()}")
        if lib.wl_display_read_events(ptr) < 0 or lib.wl_display_dispatch_pending(ptr) < 0:
            raise ConnectionLost(f"{self.name}: {self._error_text()}")

    def _error_text(self) -> str:
        ptr = self.display._ptr
        err = lib.wl_display_get_error(ptr) if ptr is not None else 0
        if err == errno.EPROTO:
            return "protocol error (the compositor ended the connection)"
        if err:
            return f"connection lost ({errno.errorcode.get(err, err)})"
        return "connection lost"

    def flush(self) -> None:
        """Send the queued requests now; if the socket is full the pump sends the rest once
        it drains. A dead connection is noticed by the pump, not here."""
        if self.closed or self._flush_blocked:
            return
        if self.display.flush() < 0 and _errno() == errno.EAGAIN:
            self._flush_blocked = True
            self._can_write.set()

    async def _drain_writes(self) -> None:
        while True:
            await self._can_write.wait()
            self._can_write = trio.Event()
            while self._flush_blocked and not self.closed:
                try:
                    await trio.lowlevel.wait_writable(self.display.get_fd())
                except trio.ClosedResourceError:
                    return
                self._flush_blocked = False
                self.flush()

    def close(self) -> None:
        """Disconnect; every proxy of this connection is dead afterwards (idempotent)."""
        if self.closed:
            return
        self.closed = True
        fd = self.display.get_fd()
        with contextlib.suppress(RuntimeError):  # outside trio: no task can be waiting
            trio.lowlevel.notify_closing(fd)
        self.display.disconnect()
