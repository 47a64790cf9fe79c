"""XenStore: the xs_wire codec (sans-I/O) and the daemon's trio-native client."""
