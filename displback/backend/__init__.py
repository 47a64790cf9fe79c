"""The backend: guest devices, connectors, buffers; serves displif over a platform.

It names no concrete platform or display: it is handed a ``Platform``
(:mod:`displback.xen.interfaces`) and a ``Display`` (:mod:`displback.display.interface`).
See docs/backend.md.

May import: ``displback.protocol``, ``displback.mapping``, ``displback.display``,
``displback.xenstore``, ``displback.systemd``, ``displback.kms``, ``displback.xen``,
``displback.wayland``, ``displback.evdev``.
"""
