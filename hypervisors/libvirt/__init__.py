"""libvirt backend (Linux KVM, or QEMU software emulation).

The backend is `hypervisors.libvirt.backend.LibvirtHypervisor`. This package does not
import it (nor libvirt-python) by itself, so its pure parts — the domain XML, the
overlay helper — load on a host without the `libvirt` extra.
"""
