"""Domain XML for a job VM, built as an ElementTree (never by string formatting).

Per-VM facts the daemon needs after a restart (orchestrator id, job id, console path,
overlay and seed paths) live in the domain's `<metadata>`, in our own namespace, so
libvirt itself holds them and `list_ours` can tell our VMs from everyone else's.
"""

from __future__ import annotations

import secrets
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass, replace
from pathlib import Path

from hypervisors.base import VmSpec
from hypervisors.handoff import CHANNEL_NAME

METADATA_NS = "https://github.com/ci-vm-orchestrator/xmlns/job/1"
METADATA_PREFIX = "orch"
ET.register_namespace(METADATA_PREFIX, METADATA_NS)


@dataclass(frozen=True)
class DomainFiles:
    overlay: Path
    seed: Path | None
    console: Path
    channel: Path | None = None  # a pool VM's job port socket


@dataclass(frozen=True)
class JobTag:
    """What our `<metadata>` element says about a domain."""

    orchestrator_id: str
    job_id: str
    console: Path | None
    overlay: Path | None
    seed: Path | None
    pool: bool = False  # role "pool": a warm pool VM, not (yet) any job's


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attrs)
    if text is not None:
        element.text = text
    return element


def metadata_element(orchestrator_id: str, job_id: str, files: DomainFiles, *, pool: bool = False) -> ET.Element:
    job = ET.Element(f"{{{METADATA_NS}}}job")
    for name, value in (
        ("orchestrator", orchestrator_id),
        ("role", "pool" if pool else "job"),
        ("job-id", job_id),
        ("console", str(files.console)),
        ("overlay", str(files.overlay)),
        ("seed", str(files.seed) if files.seed else ""),
    ):
        ET.SubElement(job, f"{{{METADATA_NS}}}{name}").text = value
    return job


def build_domain_xml(
    spec: VmSpec,
    files: DomainFiles,
    *,
    domain_type: str,
    orchestrator_id: str,
    network: str | None,
    disk_format: str = "qcow2",
) -> str:
    domain = ET.Element("domain", type=domain_type)
    _sub(domain, "name", spec.name)
    metadata = _sub(domain, "metadata")
    metadata.append(metadata_element(orchestrator_id, spec.job_id, files, pool=spec.job_channel is not None))
    _sub(domain, "memory", str(spec.memory_mb), unit="MiB")
    _sub(domain, "vcpu", str(spec.cpus), placement="static")
    os_element = _sub(domain, "os")
    _sub(os_element, "type", "hvm", arch="x86_64", machine="pc")
    if spec.direct_boot is not None:
        _sub(os_element, "kernel", str(spec.direct_boot.kernel))
        if spec.direct_boot.initrd is not None:
            _sub(os_element, "initrd", str(spec.direct_boot.initrd))
        if spec.direct_boot.cmdline:
            _sub(os_element, "cmdline", spec.direct_boot.cmdline)
    else:
        _sub(os_element, "boot", dev="hd")
    features = _sub(domain, "features")
    _sub(features, "acpi")
    _sub(features, "apic")
    if domain_type == "kvm":
        _sub(domain, "cpu", mode="host-passthrough")
    _sub(domain, "clock", offset="utc")
    # A job VM that stops for any reason is over: never restart it.
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        _sub(domain, event, "destroy")
    devices = _sub(domain, "devices")
    disk = _sub(devices, "disk", type="file", device="disk")
    _sub(disk, "driver", name="qemu", type=disk_format, discard="unmap")
    _sub(disk, "source", file=str(files.overlay))
    _sub(disk, "target", dev="vda", bus="virtio")
    if files.seed is not None:
        # IDE CD-ROM, not virtio: some cloud images look for their seed (and their root
        # disk) in ways a virtio seed disk confuses.
        cdrom = _sub(devices, "disk", type="file", device="cdrom")
        _sub(cdrom, "driver", name="qemu", type="raw")
        _sub(cdrom, "source", file=str(files.seed))
        _sub(cdrom, "target", dev="hdc", bus="ide")
        _sub(cdrom, "readonly")
    if network is not None:
        interface = _sub(devices, "interface", type="network")
        _sub(interface, "source", network=network)
        _sub(interface, "model", type="virtio")
    serial = _sub(devices, "serial", type="file")
    # Appended, never truncated: the daemon cuts an overlong console in place while QEMU
    # writes (orchestrator.core.consolecap), and a re-run keeps the earlier attempt's output.
    _sub(serial, "source", path=str(files.console), append="on")
    _sub(serial, "target", port="0")
    console = _sub(devices, "console", type="file")
    _sub(console, "source", path=str(files.console), append="on")
    _sub(console, "target", type="serial", port="0")
    if spec.job_channel is not None:
        # A pool VM's job port (virtio-serial; QEMU listens on the socket).
        channel = _sub(devices, "channel", type="unix")
        _sub(channel, "source", mode="bind", path=str(spec.job_channel))
        _sub(channel, "target", type="virtio", name=CHANNEL_NAME)
    if spec.job_channel is not None:
        # A generation id a restored copy changes: guests with vmgenid reseed their RNG.
        _sub(domain, "genid")
    rng = _sub(devices, "rng", model="virtio")
    _sub(rng, "backend", "/dev/urandom", model="random")
    _sub(devices, "memballoon", model="none")
    return ET.tostring(domain, encoding="unicode")


def random_mac() -> str:
    """A locally administered MAC in QEMU's 52:54:00 range (what libvirt picks itself)."""
    return "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))


@dataclass(frozen=True)
class RestoredDomain:
    xml: str
    mac_change: tuple[str, str] | None  # (the template's MAC, this VM's), when it has a NIC


def rewrite_for_restore(
    saved_xml: str, *, name: str, files: DomainFiles, template_seed: Path, orchestrator_id: str
) -> RestoredDomain:
    """A template's saved domain XML as one pool VM restored from it: its own name, UUID,
    generation id, MAC, disk overlay, console, job port and tag; the template's seed (the
    guest read it before the save; the device must still be there)."""
    root = ET.fromstring(saved_xml)
    _one(root, "name").text = name
    _one(root, "uuid").text = str(uuid.uuid4())
    genid = root.find("genid")
    if genid is not None:  # a new generation: a guest with vmgenid reseeds its RNG at once
        genid.text = str(uuid.uuid4())
    metadata = _one(root, "metadata")
    for old in metadata.findall(f"{{{METADATA_NS}}}job"):
        metadata.remove(old)
    metadata.append(metadata_element(orchestrator_id, "", replace(files, seed=template_seed), pool=True))
    devices = _one(root, "devices")
    for disk in devices.findall("disk"):
        source = _one(disk, "source")
        source.set("file", str(files.overlay if disk.get("device") == "disk" else template_seed))
        backing = disk.find("backingStore")
        if backing is not None:  # libvirt's record of the template's chain: it re-probes ours
            disk.remove(backing)
    for device in devices.findall("serial") + devices.findall("console"):
        _one(device, "source").set("path", str(files.console))
    for channel in devices.findall("channel"):
        if channel.get("type") == "unix" and files.channel is not None:
            _one(channel, "source").set("path", str(files.channel))
    mac_change = None
    for interface in devices.findall("interface"):
        mac = interface.find("mac")
        if mac is not None:
            new = random_mac()
            mac_change = (mac.get("address", ""), new)
            mac.set("address", new)
        target = interface.find("target")
        if target is not None:  # the template's tap device name: let libvirt pick one
            interface.remove(target)
    for seclabel in root.findall("seclabel"):
        if seclabel.get("type") == "dynamic":  # labels made for the template's UUID
            for label in seclabel.findall("label") + seclabel.findall("imagelabel"):
                seclabel.remove(label)
    return RestoredDomain(ET.tostring(root, encoding="unicode"), mac_change)


def _one(parent: ET.Element, path: str) -> ET.Element:
    element = parent.find(path)
    if element is None:
        raise ValueError(f"the saved domain XML has no <{path}>")
    return element


def read_job_tag(domain_xml: str) -> JobTag | None:
    """Our tag from a domain's XML, or None when the domain is not ours at all."""
    root = ET.fromstring(domain_xml)
    job = root.find(f"metadata/{{{METADATA_NS}}}job")
    if job is None:
        return None

    def text(name: str) -> str:
        element = job.find(f"{{{METADATA_NS}}}{name}")
        return (element.text or "") if element is not None else ""

    def path(name: str) -> Path | None:
        value = text(name)
        return Path(value) if value else None

    return JobTag(
        text("orchestrator"),
        text("job-id"),
        path("console"),
        path("overlay"),
        path("seed"),
        pool=text("role") == "pool",
    )
