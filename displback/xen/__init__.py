"""Xen platform interfaces (event channels, grant mapping, dma-bufs) the backend talks to.

:mod:`.interfaces` is what the backend programs against; :mod:`.real` implements it on a
real Dom0 (``/dev/xen/evtchn``, ``/dev/xen/gntdev``) with the ioctls of :mod:`.ioctls`;
:mod:`displback.sim.platform` implements it on the simulated machine.

May import: ``displback.protocol``, ``displback.mapping``, ``displback.display``,
``displback.xenstore``, ``displback.systemd``.
"""
