"""Fixtures every test directory may use: the simulated hypervisor with its leak checks."""

from tests.sim.conftest import hypervisor, hypervisor_process

__all__ = ["hypervisor", "hypervisor_process"]
