"""Displays the backend shows guest connectors on: the interface and its implementations.

:mod:`.interface` is what the backend programs against; :mod:`.virtual` is the in-memory
display (simulation, tests, headless hosts); :mod:`.pixels` converts frames to RGB and copies
rows for the copy path; :mod:`.common` is what the virtual and the KMS display share. See
docs/display.md.

May import: ``displback.protocol``, ``displback.mapping``.
"""

from displback.display import interface
from displback.display.interface import *  # noqa: F403 - the package re-exports the interface
from displback.display.pixels import copy_frame, frame_end, to_rgb

__all__ = [*interface.__all__, "copy_frame", "frame_end", "to_rgb"]
