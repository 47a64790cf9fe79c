"""Tests of the sans-I/O displif protocol core (displback.protocol)."""
