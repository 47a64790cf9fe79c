"""XenStore: the xs_wire codec (sans-I/O) and the daemon's trio-native client.

:mod:`.wire` is the codec both ends use (the client and the simulated xenstored), with the
permission entries; :mod:`.transport` opens the socket or the xenbus device; :mod:`.client`
is the client. See docs/xenstore.md.

May import: ``displback.protocol``, ``displback.mapping``.
"""
