"""Guest connectors on the connectors of a real DRM/KMS card, through our own ioctl bindings.

:mod:`.uapi` and :mod:`.device` are the kernel interface; :mod:`.display` is the display
(see its docstring for the module of each part); :mod:`.info` is ``displback kms-info``.
See docs/kms.md.

May import: ``displback.protocol``, ``displback.mapping``, ``displback.display``,
``displback.xenstore``, ``displback.systemd``.
"""
