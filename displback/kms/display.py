"""A display on real hardware: guest connectors shown on DRM/KMS connectors of a card.

:class:`KmsDisplay` implements :mod:`displback.display.interface` like
:class:`~displback.display.virtual.VirtualDisplay` does, on a :class:`DrmDevice`. It owns the
card: opening it, DRM master, the client caps, one :class:`~displback.kms.output.KmsOutput`
per configured connector, the one task reading flip events and the hot-plug poll, and setting
the card back as it was when it closes. The rooms it delegates to:

* :mod:`.cards` — which card (the configured one, or the first ``/dev/dri/card*`` with a
  connected connector);
* :mod:`.crtcs` — a CRTC per connector (the one already driving it if free), its primary
  plane, and the CRTC state saved at open and restored at close;
* :mod:`.modes` — the guest's resolution if the connector offers it (highest refresh, or the
  one closest to ``refresh_hz``), else the connector's preferred mode;
* :mod:`.output` — what each output shows: its flips, releases, snapshots and hot-plug;
* :mod:`.commit` with :mod:`.atomic` and :mod:`.legacy` — how a frame reaches the screen:
  atomic commits (NONBLOCK with PAGE_FLIP_EVENT; ALLOW_MODESET and a MODE_ID blob when the
  CRTC is off) when the driver has them and ``atomic`` is not False, else SETCRTC (blocking,
  in a thread) then PAGE_FLIP;
* :mod:`.letterbox` — a frame of another size where the plane cannot be placed: centred on
  a mode-sized dumb buffer of ours (two alternate), black around. Letterboxing copies, so
  imports that would need it are refused (``ImportRefused``) and the backend copies instead;
* :mod:`.framebuffers` — imported and dumb framebuffers and their release (RMFB of the FB
  on screen would turn the CRTC off, so the output first switches to a kept copy).

One reader task reads the card fd and hands each flip event to the output whose ``user_data``
token it carries; ``FlipResult`` holds the kernel's vblank sequence and its
``CLOCK_MONOTONIC`` time. A flip whose event does not come within ``flip_timeout_s`` lands
anyway (logged), so a driver bug cannot stall a guest. Connector status is polled every
``hotplug_poll_s`` without forcing a probe. Snapshots read dumb buffers through their mapping
and imported ones through ``dmabuf_importer`` (or ``mmap`` of a dup of the dma-buf fd); a
zero-copy frame that cannot be mapped cannot be snapshotted (:class:`DisplayError` says so).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypedDict, Unpack

import trio

from displback.display.common import DisplayBase, check_output_names, size_fits
from displback.display.interface import DisplayError
from displback.kms import uapi
from displback.kms.atomic import AtomicCommitter, PropertyCache
from displback.kms.cards import find_card
from displback.kms.commit import Committer
from displback.kms.crtcs import SavedCrtc, pick_crtc, primary_plane, restore_crtcs, save_crtc
from displback.kms.device import DrmDevice, DrmError, open_card
from displback.kms.framebuffers import DumbAllocation, new_dumb
from displback.kms.legacy import LegacyCommitter
from displback.kms.output import KmsOutput
from displback.kms.uapi import ClientCap
from displback.mapping import DmabufImporter
from displback.protocol.constants import PixelFormat

if TYPE_CHECKING:
    from displback.display.interface import Display, DumbFramebuffer, Output
    from displback.kms.framebuffers import KmsDumbFramebuffer

__all__ = ["KmsDisplay", "KmsDisplayOptions", "KmsOutputConfig"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class KmsOutputConfig:
    """One output: the connector's kernel name and the guest resolution wanted on it."""

    connector: str
    width: int | None = None
    height: int | None = None
    refresh_hz: float | None = None

    def __post_init__(self) -> None:
        if not self.connector:
            raise ValueError("an output needs a connector name such as HDMI-A-1")
        if (self.width is None) != (self.height is None):
            raise ValueError(f"{self.connector}: give both width and height, or neither")
        if (
            self.width is not None
            and self.height is not None
            and not size_fits(self.width, self.height)
        ):
            raise ValueError(f"{self.connector}: bad resolution {self.width}x{self.height}")


class KmsDisplayOptions(TypedDict, total=False):
    """The keyword options of :class:`KmsDisplay` (defaults there), passed on by ``open``."""

    atomic: bool | None
    dmabuf_importer: DmabufImporter | None
    flip_timeout_s: float
    hotplug_poll_s: float


class KmsDisplay(DisplayBase[KmsOutput]):
    """Outputs on the connectors of one DRM card; open with :meth:`open`."""

    def __init__(
        self,
        device: DrmDevice,
        outputs: Sequence[KmsOutputConfig],
        *,
        atomic: bool | None = None,
        dmabuf_importer: DmabufImporter | None = None,
        flip_timeout_s: float = 1.0,
        hotplug_poll_s: float = 1.0,
        owns_device: bool = True,
    ) -> None:
        check_output_names([c.connector for c in outputs], "connector")
        self.device = device
        self.importer = dmabuf_importer
        self.flip_timeout_s = flip_timeout_s
        self.hotplug_poll_s = hotplug_poll_s
        self.tokens = itertools.count(1)
        """``user_data`` of the next flip event (one sequence for the card's outputs)."""
        self.awaiting: dict[int, KmsOutput] = {}
        """The output of each flip event still to come, by token."""
        self._owns_device = owns_device
        self._closed = False
        self._nursery: trio.Nursery | None = None
        self._saved: list[SavedCrtc] = []
        self._props = PropertyCache(device)
        self._master = False
        try:
            self._setup(outputs, atomic)
        except BaseException:
            self._teardown()
            raise

    # -- set-up --------------------------------------------------------------------------

    def _setup(self, configs: Sequence[KmsOutputConfig], atomic: bool | None) -> None:
        dev = self.device
        self.driver = dev.version().name
        try:
            dev.set_master()
        except DrmError as exc:
            raise DisplayError(
                f"cannot become DRM master of {dev.path or self.driver} (is a compositor or "
                f"another displback running?): {exc}"
            ) from exc
        self._master = True
        if not dev.has_cap(uapi.Cap.DUMB_BUFFER):
            raise DisplayError(f"{self.driver} has no dumb buffers")
        self.prime_import = bool(dev.has_cap(uapi.Cap.PRIME) & uapi.DRM_PRIME_CAP_IMPORT)
        self.modifiers = bool(dev.has_cap(uapi.Cap.ADDFB2_MODIFIERS))
        dev.set_client_cap(ClientCap.UNIVERSAL_PLANES, 1)
        self.atomic = False
        if atomic is not False:
            try:
                dev.set_client_cap(ClientCap.ATOMIC, 1)
                self.atomic = True
            except DrmError as exc:
                if atomic:
                    raise DisplayError(f"{self.driver} has no atomic mode-setting: {exc}") from exc
        res = dev.resources()
        by_name = {c.name: c for c in (dev.connector(cid, probe=True) for cid in res.connectors)}
        missing = [c.connector for c in configs if c.connector not in by_name]
        if missing:
            raise DisplayError(
                f"{self.driver} has no connector {', '.join(missing)} "
                f"(it has {', '.join(sorted(by_name)) or 'none'})"
            )
        planes = [dev.plane(pid) for pid in dev.plane_ids()]
        taken: set[int] = set()
        self._outputs: dict[str, KmsOutput] = {}
        for config in configs:
            conn = by_name[config.connector]
            try:
                crtc_id = pick_crtc(dev, res.crtcs, conn, taken)
            except DisplayError as exc:
                raise DisplayError(f"{self.driver}: {exc}") from None
            taken.add(crtc_id)
            plane = primary_plane(res.crtcs, crtc_id, planes, self._props.of)
            committer: Committer
            if self.atomic:
                if plane is None:
                    raise DisplayError(f"{self.driver}: no primary plane for CRTC {crtc_id}")
                committer = AtomicCommitter(
                    dev, crtc_id, conn.id, plane_id=plane.id, props=self._props
                )
            else:
                committer = LegacyCommitter(dev, crtc_id, conn.id)
            self._saved.append(save_crtc(dev, res.connectors, crtc_id))
            output = KmsOutput(
                self,
                config,
                conn,
                committer,
                None if plane is None else plane.id,
                None if plane is None else frozenset(plane.formats),
            )
            self._outputs[conn.name] = output
            w, h, hz = output.mode
            log.info(
                "output %s on %s (%s), CRTC %d, mode %dx%d@%g, %s commits; "
                "frames of another size: %s",
                conn.name,
                self.card,
                self.driver,
                crtc_id,
                w,
                h,
                hz,
                committer.path,
                committer.other_sizes,
            )

    @property
    def card(self) -> str:
        """The card's device path (or its driver's name when opened from an fd)."""
        return self.device.path or self.driver

    def linear_modifiers(self, planes: int) -> list[int] | None:
        """The modifiers argument of ADDFB2 for a linear buffer (None: the card has none)."""
        return [uapi.DRM_FORMAT_MOD_LINEAR] * planes if self.modifiers else None

    def new_dumb(self, width: int, height: int, fmt: PixelFormat) -> DumbAllocation:
        """A mapped dumb buffer with a linear FB on this card."""
        return new_dumb(
            self.device, width, height, fmt, driver=self.driver, modifiers=self.linear_modifiers(1)
        )

    # -- life ----------------------------------------------------------------------------

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        outputs: Sequence[KmsOutputConfig],
        *,
        card: str | os.PathLike[str] | None = None,
        device: DrmDevice | None = None,
        **options: Unpack[KmsDisplayOptions],
    ) -> AsyncIterator[KmsDisplay]:
        """Open a display on ``device``, on ``card``, or on the first card that fits."""
        if device is not None:
            dev, owns = device, False
        elif card is not None:
            dev, owns = open_card(card), True
        else:
            dev, owns = find_card([c.connector for c in outputs]), True
        display = cls(dev, outputs, owns_device=owns, **options)
        async with display._running() as nursery:
            nursery.start_soon(display._read_events)
            if display.hotplug_poll_s > 0:
                nursery.start_soon(display._poll_hotplug)
            for output in display._outputs.values():
                await nursery.start(output.run)
            yield display

    async def _read_events(self) -> None:
        while True:
            await self.device.wait_readable()
            for event in self.device.read_events():
                if event.flip_complete:
                    output = self.awaiting.get(event.user_data)
                    if output is not None:
                        output.on_flip_event(event)

    async def _poll_hotplug(self) -> None:
        while True:
            await trio.sleep(self.hotplug_poll_s)
            for output in self._outputs.values():
                try:
                    output.poll_connector()
                except (DrmError, DisplayError) as exc:
                    log.warning("%s: hot-plug check failed: %s", output, exc)

    def _shut_down(self) -> None:
        for output in self._outputs.values():
            output.settle_native()  # no copy thread flips after the CRTCs are given back
        restore_crtcs(self.device, self._saved)
        super()._shut_down()
        self._teardown()

    def _teardown(self) -> None:
        if self._master:
            self._master = False
            with contextlib.suppress(DrmError):
                self.device.drop_master()
        if self._owns_device:
            self.device.close()


if TYPE_CHECKING:

    def _implements_interface(
        display: KmsDisplay, output: KmsOutput, dumb: KmsDumbFramebuffer
    ) -> tuple[Display, Output, DumbFramebuffer]:
        return display, output, dumb
