"""Xen platform interfaces (event channels, grant mapping, dma-bufs) the backend talks to."""
