"""Talking to systemd: readiness and watchdog pings, the fd store, and the journal.

Below the application (which reports readiness and logs through it) and the backend (which
keeps be-alloc buffers in the fd store across a restart), so both may import it.

May import: ``displback.protocol``, ``displback.mapping``.
"""
