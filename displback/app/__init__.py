"""The application: the ``displback`` command and what only it needs.

``cli`` parses the command line and dispatches to ``run`` (the daemon: the platform, a
display and the backend wired together), ``demo``, ``status`` (``status_socket`` serves and
asks the :mod:`.status` model) and ``check-config`` (``checkconfig``); ``config`` reads the
TOML file (``tomllines`` finds its keys' lines) with the :mod:`.validators` the command line
uses too; ``logs`` sets up logging. Nothing imports it.

May import: ``displback.protocol``, ``displback.mapping``, ``displback.display``,
``displback.xenstore``, ``displback.systemd``, ``displback.kms``, ``displback.xen``,
``displback.wayland``, ``displback.evdev``, ``displback.backend``, ``displback.sim``.
"""
