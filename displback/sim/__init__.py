"""A simulated Xen machine (hypervisor and platform devices): displback without Xen.

The hypervisor, xenstored and toolstack, the platform the backend is given, and a guest
frontend that behaves like Linux's xen-drm-front; :mod:`.machine` runs a backend on it. See
docs/simulation.md.

May import: ``displback.protocol``, ``displback.mapping``, ``displback.display``,
``displback.xenstore``, ``displback.systemd``, ``displback.kms``, ``displback.xen``,
``displback.wayland``, ``displback.evdev``, ``displback.backend``.
"""
