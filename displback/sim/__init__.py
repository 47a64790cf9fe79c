"""A simulated Xen machine (hypervisor and platform devices): displback without Xen."""
