"""The Wayland display: a window per guest connector, kept while the compositor comes and goes.

:class:`WaylandDisplay` is both the :class:`~displback.display.interface.Display` and the
backend's output provider (``acquire``/``release``, as
:class:`~displback.backend.outputs.OutputMap` is for fixed outputs): a guest connector gets
its own :class:`~displback.wayland.window.WaylandOutput` when its device connects — sized to
the connector's resolution, titled ``"<guest name>: connector <index>"`` — and loses it when
the device goes. ``fullscreen`` (the ``assign`` table of the configuration) names the
compositor output a connector's window goes fullscreen on, by connector key
(``"<domid>/<devid>/<index>"``) or unique-id, as :class:`OutputMap` matches them.

Three tasks in the display's nursery:

* the **connection** task connects to the compositor, attaches every output (their windows
  come back with their last frame), pumps events until the connection ends, then detaches
  them and tries again after a back-off (``reconnect_min_s`` doubling up to
  ``reconnect_max_s``; a connection that worked starts the back-off over). The guests
  never notice: while there is no compositor their flips land by the fallback timer;
* the **fallback timer** lands every flip whose frame callback did not come in time (see
  :mod:`~displback.wayland.window`): one task for all windows, asleep without a timer
  while no flip is pending;
* the connection's own writer (inside the pump) sends what a full socket held back.
"""

from __future__ import annotations

import math
import types
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import structlog
import trio

from displback.display.common import DisplayBase
from displback.display.input import InputPorts
from displback.protocol.constants import PixelFormat
from displback.protocol.layout import ConnectorConfig
from displback.wayland.connection import ConnectionLost, WaylandConnection
from displback.wayland.seat import SeatRouter
from displback.wayland.window import WaylandOutput, WindowSpec

if TYPE_CHECKING:
    from displback.display.interface import Display, Output

__all__ = ["WaylandDisplay", "window_title"]

_KEY_SHAPE = "{domid}/{devid}/{index}"
_REQUIRED = frozenset({PixelFormat.ARGB8888, PixelFormat.XRGB8888})


def window_title(guest: str | None, domid: int, index: int) -> str:
    """``"<guest name>: connector <index>"`` (``dom<domid>`` when the name is unknown)."""
    return f"{guest or f'dom{domid}'}: connector {index}"


class WaylandDisplay(DisplayBase[WaylandOutput]):
    """Guest connectors as windows of the compositor at ``socket``; open with :meth:`open`."""

    def __init__(
        self,
        socket: str,
        *,
        refresh_hz: float = 60.0,
        fullscreen: Mapping[str, str] | None = None,
        input_ports: InputPorts | None = None,
        reconnect_min_s: float = 0.1,
        reconnect_max_s: float = 5.0,
        connect_timeout_s: float = 5.0,
    ) -> None:
        if not (math.isfinite(refresh_hz) and 1.0 <= refresh_hz <= 1000.0):
            raise ValueError(f"refresh rate {refresh_hz} Hz outside 1..1000")
        self.socket = socket
        self.refresh_hz = refresh_hz
        self.fullscreen = dict(fullscreen or {})
        self.reconnect_min_s = reconnect_min_s
        self.reconnect_max_s = reconnect_max_s
        self.connect_timeout_s = connect_timeout_s
        self._outputs: dict[str, WaylandOutput] = {}
        self._closed = False
        self._nursery: trio.Nursery | None = None
        self._conn: WaylandConnection | None = None
        self._timer_wake = trio.Event()
        self._log = structlog.get_logger("displback.wayland")
        self.seat = SeatRouter(input_ports)
        #: Formats the last compositor's wl_shm announced (what windows can show).
        self.shm_formats: frozenset[PixelFormat] = _REQUIRED
        #: Connections made (1 after the first; each reconnect adds one).
        self.connections = 0
        self.connected = trio.Event()  # set while connected; replaced on each loss

    @classmethod
    @asynccontextmanager
    async def open(cls, socket: str, **options: Any) -> AsyncIterator[WaylandDisplay]:
        """Open the display; it connects (and reconnects) in the background."""
        display = cls(socket, **options)
        async with display._running() as nursery:
            nursery.start_soon(display._run_timer)
            nursery.start_soon(display._run_connection)
            yield display

    # -- the output provider -------------------------------------------------------------

    @property
    def outputs(self) -> Mapping[str, WaylandOutput]:
        return types.MappingProxyType(self._outputs)

    def acquire(
        self, domid: int, devid: int, connector: ConnectorConfig, guest: str | None = None
    ) -> WaylandOutput | None:
        """A new window for guest connector ``connector`` (None: the display is closed)."""
        if self._closed:
            return None
        key = _KEY_SHAPE.format(domid=domid, devid=devid, index=connector.index)
        target = self.fullscreen.get(key)
        if target is None and connector.unique_id is not None:
            target = self.fullscreen.get(connector.unique_id)
        spec = WindowSpec(
            name=f"dom{domid}-{devid}-{connector.index}",
            title=window_title(guest, domid, connector.index),
            width=connector.width,
            height=connector.height,
            refresh_hz=self.refresh_hz,
            fullscreen_on=target,
            connector=(domid, devid, connector.index),
        )
        old = self._outputs.pop(spec.name, None)
        if old is not None:  # the same connector again before its release: one window
            old._close()
        output = WaylandOutput(self, spec)
        self.seat.add_output(output)
        self._outputs[spec.name] = output
        if self._conn is not None:
            output.attach(self._conn)
        return output

    def release(self, output: Output) -> None:
        """The connector went: destroy its window and free its frames."""
        if not isinstance(output, WaylandOutput):
            return
        if self._outputs.get(output.name) is output:
            del self._outputs[output.name]
        output._close()
        self.seat.remove_output(output)

    # -- tasks ---------------------------------------------------------------------------

    def _timer_changed(self) -> None:
        self._timer_wake.set()

    async def _run_timer(self) -> None:
        """Land each flip whose frame callback is overdue (window hidden, no compositor)."""
        while True:
            deadlines = [d for o in self._outputs.values() if (d := o.pending_deadline) is not None]
            if not deadlines:
                self._timer_wake = trio.Event()
                await self._timer_wake.wait()
                continue
            soonest = min(deadlines)
            if trio.current_time() < soonest:
                self._timer_wake = trio.Event()
                with trio.move_on_at(soonest):
                    await self._timer_wake.wait()
                continue
            now = trio.current_time()
            for output in list(self._outputs.values()):
                output.land_if_due(now)

    async def _run_connection(self) -> None:
        backoff = self.reconnect_min_s
        while True:
            try:
                conn = await WaylandConnection.connect(
                    self.socket, timeout=self.connect_timeout_s, on_seat=self.seat.add_seat
                )
            except ConnectionLost as exc:
                self._log.warning("no compositor", reason=str(exc), retry_in_s=round(backoff, 2))
                await trio.sleep(backoff)
                backoff = min(backoff * 2, self.reconnect_max_s)
                continue
            backoff = self.reconnect_min_s
            self.connections += 1
            self._conn = conn
            self.shm_formats = (
                frozenset(f for f in PixelFormat if f.value in conn.shm_formats) | _REQUIRED
            )
            self._log.info(
                "compositor connected",
                socket=self.socket,
                outputs=sorted(conn.outputs),
                seats=len(conn.seats),
                dmabuf=conn.dmabuf_offered,
            )
            for output in list(self._outputs.values()):
                output.attach(conn)
            self.connected.set()
            try:
                await conn.pump()
            except ConnectionLost as exc:
                self._log.warning("compositor gone", reason=str(exc))
            finally:
                self._conn = None
                self.connected = trio.Event()
                for output in list(self._outputs.values()):
                    output.detach()
                self.seat.connection_lost()
                conn.close()
            await trio.sleep(backoff)

    def _shut_down(self) -> None:
        super()._shut_down()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    # -- tests and tools -----------------------------------------------------------------

    @property
    def connection(self) -> WaylandConnection | None:
        """The live connection, if any."""
        return self._conn


if TYPE_CHECKING:

    def _implements_interface(display: WaylandDisplay) -> Display:
        return display
