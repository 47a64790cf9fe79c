"""The displif protocol core: sans-I/O encode/decode, ring and event-page logic.

Nothing in this package does I/O, imports trio, or touches a Xen device: it works on
``bytes`` and writable buffers (``memoryview``, ``mmap``) handed to it. See docs/protocol.md
and docs/architecture.md (the layers).

May import: nothing of displback.
"""
