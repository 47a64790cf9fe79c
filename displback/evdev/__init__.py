"""Dom0 input devices (evdev) as input sources for guests: read, grabbed, translated.

:mod:`.uapi` holds the kernel's numbers and layouts (``linux/input.h``, ``linux/uinput.h``),
:mod:`.device` one open ``/dev/input/event*`` (plain ``ioctl`` and ``read``), :mod:`.translate`
the sans-I/O translation of evdev events into an
:class:`~displback.display.input.InputSink`, and :mod:`.source` the task that finds a
configured device, grabs it and feeds a guest while it exists. See docs/input.md.

May import: ``displback.protocol``, ``displback.mapping``, ``displback.display``,
``displback.xenstore``, ``displback.systemd``.
"""
