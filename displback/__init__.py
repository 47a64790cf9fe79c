"""displback: the para-virtual display (displif) backend daemon for Xen Dom0."""

__version__ = "0.1.0"
