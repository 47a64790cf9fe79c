"""Guest connectors as windows of a Wayland compositor, through pywayland (the ``wayland``
extra: a Dom0 that shows guests on KMS or a virtual display never imports this package).

:mod:`.connection` is one connection to the compositor, pumped from trio; :mod:`.window` is
one guest connector's window (an :class:`~displback.display.interface.Output`);
:mod:`.seat` routes the compositor's keyboard, pointer and touch to the guest's input sink;
:mod:`.display` is the display that makes a window per guest connector and reconnects when
the compositor comes back. See docs/outputs.md.

May import: ``displback.protocol``, ``displback.mapping``, ``displback.display``,
``displback.xenstore``, ``displback.systemd``.
"""
