"""Tests of displback.display: interface behaviour, the virtual display and pixel formats."""
