"""What the simulated guest's driver holds and reports: its buffers and framebuffers, its
counters, how a flip ended, the error of a failed request, and Linux's timeouts.

May touch: :mod:`displback.protocol` (sizes, formats) and the simulated platform's mappings.
"""

from __future__ import annotations

import enum
import errno as _errno
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from displback.protocol.constants import (
    LINUX_FRAME_DONE_TIMEOUT_MS,
    LINUX_RESPONSE_TIMEOUT_MS,
    Op,
    PixelFormat,
    pages_for,
    pitch_for,
)
from displback.sim.memmap import PageMapping
from displback.sim.platform import SimGrantMapping

log = logging.getLogger(__name__)


DEFAULT_RESPONSE_TIMEOUT: Final = LINUX_RESPONSE_TIMEOUT_MS / 1000


DEFAULT_FRAME_DONE_TIMEOUT: Final = LINUX_FRAME_DONE_TIMEOUT_MS / 1000


DEFAULT_END_ACCESS_RETRY: Final = 1.0  # Linux retries deferred grant ends once a second


DEFAULT_REMOVE_TIMEOUT: Final = 1.0  # xen_drv_remove polls 100 x 10 ms for backend InitWait


#: xenbus_frontend_dev_shutdown's wait for the backend's Closing (5*HZ).
DEFAULT_SHUTDOWN_TIMEOUT: Final = 5.0


RequestHook = Callable[[bytes], bytes]
"""Rewrites the 64 bytes of a request just before they are copied into the ring."""


class GuestRequestError(OSError):
    """A request failed: ``errno`` is the backend's (negated status), ``ETIMEDOUT`` (no answer
    within the response timeout) or ``EIO`` (not connected, torn down meanwhile, ring full)."""

    def __init__(self, errno: int, message: str, *, op: Op | None = None) -> None:
        super().__init__(errno, message)
        self.op = op


class FlipOutcome(enum.Enum):
    """How a page flip ended after its OK response."""

    DONE = "done"  # EVT_PG_FLIP arrived in time
    FRAME_DONE_TIMEOUT = "frame_done_timeout"  # "Frame done timed-out, releasing"
    RELEASED = "released"  # the device was torn down meanwhile


@dataclass
class GuestConnectorStats:
    """Per-connector counters (requests on connector 0's ring count for connector 0)."""

    state: str = "offline"  # offline | connected | enabled | error
    frames_drawn: int = 0
    flips_ok: int = 0
    flip_errors: int = 0
    frame_done_timeouts: int = 0
    response_timeouts: int = 0
    requests_sent: int = 0
    responses_ignored: int = 0
    events: int = 0
    events_skipped: int = 0
    events_unexpected: int = 0
    set_config_errors: int = 0


@dataclass
class GuestStats:
    """Whole-device counters."""

    handshakes: int = 0
    disconnects: int = 0
    fatal_errors: int = 0
    end_access_deferred: int = 0
    end_access_retries: int = 0
    ring_full: int = 0
    bad_rsp_prod: int = 0
    bad_in_prod: int = 0
    connectors: dict[int, GuestConnectorStats] = field(default_factory=dict)


class GuestBuffer:
    """A display buffer (dumb or imported) shared with the backend; ``buffer`` is its memory."""

    def __init__(
        self,
        cookie: int,
        *,
        width: int,
        height: int,
        bpp: int,
        size: int,
        data_ofs: int,
        be_alloc: bool,
        generation: int,
    ) -> None:
        self.cookie = cookie
        self.width = width
        self.height = height
        self.bpp = bpp
        self.pitch = pitch_for(width, bpp)
        self.size = size
        self.data_ofs = data_ofs
        self.be_alloc = be_alloc
        self.npages = pages_for(size)
        self.generation = generation
        self.freed = False
        self.pfns: list[int] = []
        self.grefs: list[int] = []
        self.dir_pfns: list[int] = []
        self.dir_grefs: list[int] = []
        self.backend_refs: list[int] = []
        self._own: PageMapping | None = None
        self._backend: SimGrantMapping | None = None

    @property
    def buffer(self) -> memoryview:
        """The pixels (``npages * 4096`` bytes): own pages, or the backend's in be-alloc mode.

        Do not keep views of it past the buffer's life: unmapping refuses while they exist.
        """
        if self._backend is not None:
            return self._backend.buffer
        if self._own is not None:
            return self._own.buffer
        raise GuestRequestError(_errno.EIO, f"buffer {self.cookie:#x} has no memory mapped")

    def __repr__(self) -> str:
        return (
            f"GuestBuffer(cookie={self.cookie:#x}, {self.width}x{self.height}x{self.bpp}, "
            f"size={self.size}, be_alloc={self.be_alloc}, freed={self.freed})"
        )


@dataclass(eq=False)
class GuestFb:
    """A framebuffer attached to a buffer (``ADDFB2``)."""

    cookie: int
    buffer: GuestBuffer
    width: int
    height: int
    fourcc: int

    @property
    def bpp(self) -> int:
        """Bits per pixel sent with SET_CONFIG: the format's, else the buffer's."""
        try:
            return PixelFormat(self.fourcc).bpp
        except ValueError:
            return self.buffer.bpp
