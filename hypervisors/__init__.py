"""Hypervisor backends behind one async protocol (see `hypervisors.base`)."""
