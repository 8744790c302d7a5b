"""libvirt backend (Linux KVM, or QEMU software emulation)."""

from hypervisors.libvirt.backend import LibvirtHypervisor

__all__ = ["LibvirtHypervisor"]
