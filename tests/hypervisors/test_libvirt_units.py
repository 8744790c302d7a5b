"""Domain XML and seed ISO, checked by parsing them back (and by libvirt's own schema)."""

from __future__ import annotations

import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from hypervisors.base import DirectBoot, ImageFormat, SeedFiles, VmSpec
from hypervisors.libvirt.domain import METADATA_NS, DomainFiles, build_domain_xml, read_job_tag
from hypervisors.seed import read_seed_iso, volume_label, write_seed_iso


def spec(**overrides) -> VmSpec:
    values = dict(
        name="job-1234",
        job_id="1234",
        image_path=Path("/img/base.qcow2"),
        image_format=ImageFormat.QCOW2,
        cpus=2,
        memory_mb=512,
        disk_gb=10,
        console_path=Path("/state/logs/1234.console"),
    )
    values.update(overrides)
    return VmSpec(**values)


FILES = DomainFiles(
    overlay=Path("/state/overlays/job-1234.qcow2"),
    seed=Path("/state/seeds/job-1234.iso"),
    console=Path("/state/logs/1234.console"),
)


def build(vm: VmSpec = None, files: DomainFiles = FILES, **kwargs) -> ET.Element:
    kwargs.setdefault("domain_type", "qemu")
    kwargs.setdefault("orchestrator_id", "orch-a")
    kwargs.setdefault("network", "default")
    xml = build_domain_xml(vm or spec(), files, **kwargs)
    if shutil.which("virt-xml-validate"):
        result = subprocess.run(["virt-xml-validate", "-", "domain"], input=xml, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
    return ET.fromstring(xml)


def test_domain_has_resources_virtio_disk_ide_seed_network_and_serial_file():
    root = build()
    assert root.get("type") == "qemu" and root.findtext("name") == "job-1234"
    assert root.findtext("vcpu") == "2"
    assert root.find("memory").get("unit") == "MiB" and root.findtext("memory") == "512"
    disk, cdrom = root.findall("devices/disk")
    assert disk.find("target").attrib == {"dev": "vda", "bus": "virtio"}
    assert (
        disk.find("driver").get("type") == "qcow2"
        and disk.find("source").get("file") == "/state/overlays/job-1234.qcow2"
    )
    assert (
        cdrom.get("device") == "cdrom"
        and cdrom.find("target").get("bus") == "ide"
        and cdrom.find("readonly") is not None
    )
    assert cdrom.find("source").get("file") == "/state/seeds/job-1234.iso"
    interface = root.find("devices/interface")
    assert interface.get("type") == "network" and interface.find("source").get("network") == "default"
    assert interface.find("model").get("type") == "virtio"
    assert root.find("devices/serial/source").get("path") == "/state/logs/1234.console"
    assert [root.findtext(e) for e in ("on_poweroff", "on_reboot", "on_crash")] == ["destroy"] * 3


def test_metadata_tags_orchestrator_and_job_and_reads_back():
    root = build()
    assert root.find(f"metadata/{{{METADATA_NS}}}job/{{{METADATA_NS}}}job-id").text == "1234"
    tag = read_job_tag(ET.tostring(root, encoding="unicode"))
    assert tag.orchestrator_id == "orch-a" and tag.job_id == "1234"
    assert tag.overlay == FILES.overlay and tag.seed == FILES.seed and tag.console == FILES.console
    assert read_job_tag("<domain type='kvm'><name>someone-elses</name></domain>") is None


def test_direct_kernel_boot_and_no_network_and_no_seed():
    vm = spec(direct_boot=DirectBoot(Path("/k/vmlinuz"), Path("/k/initrd"), "console=ttyS0 quiet"))
    root = build(vm, DomainFiles(FILES.overlay, None, FILES.console), network=None)
    assert root.findtext("os/kernel") == "/k/vmlinuz" and root.findtext("os/initrd") == "/k/initrd"
    assert root.findtext("os/cmdline") == "console=ttyS0 quiet"
    assert root.find("os/boot") is None
    assert root.find("devices/interface") is None
    assert len(root.findall("devices/disk")) == 1


def test_kvm_gets_host_cpu_and_qemu_does_not():
    assert build(domain_type="kvm").find("cpu").get("mode") == "host-passthrough"
    assert build(domain_type="qemu").find("cpu") is None


@pytest.mark.parametrize("hostile", ["a'b", 'x"><evil/>', "&amp;", "]]>"])
def test_hostile_text_is_escaped_not_interpreted(hostile):
    vm = spec(direct_boot=DirectBoot(Path("/k/vmlinuz"), None, f"console=ttyS0 {hostile}"))
    root = build(vm)
    assert root.findtext("os/cmdline") == f"console=ttyS0 {hostile}"
    assert root.find(".//evil") is None


def test_seed_iso_has_cidata_label_and_lowercase_files(tmp_path):
    path = tmp_path / "seed.iso"
    write_seed_iso(
        SeedFiles(user_data=b"#!/bin/sh\necho hi\n", meta_data=b"instance-id: j1\n", network_config=b"version: 2\n"),
        path,
    )
    assert volume_label(path) == "cidata"
    assert read_seed_iso(path) == {
        "user-data": b"#!/bin/sh\necho hi\n",
        "meta-data": b"instance-id: j1\n",
        "network-config": b"version: 2\n",
    }
    assert not (tmp_path / "seed.iso.partial").exists()


def test_seed_without_network_config_omits_it(tmp_path):
    path = tmp_path / "seed.iso"
    write_seed_iso(SeedFiles(user_data=b"u", meta_data=b"m"), path)
    assert set(read_seed_iso(path)) == {"user-data", "meta-data"}
