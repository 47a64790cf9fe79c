"""The simulated guest: one domain's vdispl frontend that behaves like Linux's xen-drm-front.

:mod:`.frontend` holds :class:`SimGuest` (the device: probe, the XenBus handshake, remove)
and the theory of operation; its parts are :mod:`.channels` (rings, event pages, requests),
:mod:`.buffers` (display buffers, framebuffers, grant ends), :mod:`.pipes` (SET_CONFIG,
PG_FLIP, GET_EDID), :mod:`.drawing` (a test pattern at a rate) and, apart, :mod:`.hostile`
(what only a hostile guest does, reached as ``guest.hostile``); :mod:`.objects` is what they
hold and report. :mod:`.kbdfront` is the guest's keyboard apart: a vkbd frontend like Linux's
xen-kbdfront (:class:`~displback.sim.guest.kbdfront.SimKbdFront`).
"""

from displback.sim.guest.frontend import SimGuest, SimGuestOptions
from displback.sim.guest.objects import (
    DEFAULT_FRAME_DONE_TIMEOUT,
    DEFAULT_RESPONSE_TIMEOUT,
    FlipOutcome,
    GuestBuffer,
    GuestConnectorStats,
    GuestFb,
    GuestRequestError,
    GuestStats,
    RequestHook,
)

__all__ = [
    "DEFAULT_FRAME_DONE_TIMEOUT",
    "DEFAULT_RESPONSE_TIMEOUT",
    "FlipOutcome",
    "GuestBuffer",
    "GuestConnectorStats",
    "GuestFb",
    "GuestRequestError",
    "GuestStats",
    "RequestHook",
    "SimGuest",
    "SimGuestOptions",
]
