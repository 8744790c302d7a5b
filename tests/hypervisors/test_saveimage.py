"""A template's save image re-headed for each restored VM, and the restored domain's XML:
checked on images built here in libvirt's documented layout (a real save image is made
and restored by the libvirt warm-pool tests)."""

from __future__ import annotations

import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from hypervisors.base import DirectBoot, ImageFormat, SeedFiles, VmSpec
from hypervisors.libvirt.domain import METADATA_NS, DomainFiles, build_domain_xml, read_job_tag, rewrite_for_restore
from hypervisors.libvirt.saveimage import HEADER_BYTES, MAGIC, SaveImageError, read_header, write_with_xml

STREAM = bytes(range(256)) * 4096  # stands in for QEMU's migration stream (1 MiB)
COOKIE = b"<cookie>\n  <cpu mode='custom'/>\n</cookie>\n"


def save_image(
    path: Path, xml: str, *, data_len: int = 65536, version: int = 2, compressed: int = 0, unused: int = 7
) -> Path:
    xml_bytes = xml.encode() + b"\0"
    data = xml_bytes + COOKIE + b"\0"
    data += b"\0" * (data_len - len(data))
    fixed = (
        MAGIC
        + struct.pack("<5I", version, data_len, 1, compressed, len(xml_bytes))
        + struct.pack("<14I", *([unused] * 14))
    )
    path.write_bytes(fixed + data + STREAM)
    return path


def test_a_copy_carries_the_new_xml_and_the_same_stream(tmp_path):
    template = save_image(tmp_path / "memory.save", "<domain><name>pool-a</name></domain>")
    write_with_xml(template, tmp_path / "copy.save", "<domain><name>pool-b-with-a-longer-name</name></domain>")
    header = read_header(tmp_path / "copy.save")
    assert header.xml == "<domain><name>pool-b-with-a-longer-name</name></domain>"
    assert header.cookie == COOKIE and header.data_len == 65536 and header.was_running == 1
    data = (tmp_path / "copy.save").read_bytes()
    assert data[HEADER_BYTES + 65536 :] == STREAM  # the migration stream, byte for byte
    assert data[len(MAGIC) + 20 : HEADER_BYTES] == struct.pack("<14I", *([7] * 14))  # unknown words kept
    assert read_header(template).xml == "<domain><name>pool-a</name></domain>"  # the template untouched
    assert not (tmp_path / "copy.save.partial").exists()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_bytes(b"QEVM" + b"\0" * 200), "not a libvirt QEMU save image"),
        (lambda p: save_image(p, "<domain/>", version=3), "version 3"),
        (lambda p: save_image(p, "<domain/>", compressed=1), "compressed"),
        (lambda p: p.write_bytes(MAGIC + struct.pack("<5I", 2, 1 << 30, 1, 0, 0) + b"\0" * 56), "implausible"),
    ],
)
def test_what_is_not_a_plain_version_2_image_is_refused(tmp_path, make, message):
    path = tmp_path / "memory.save"
    make(path)
    with pytest.raises(SaveImageError, match=message):
        read_header(path)


def test_an_xml_that_does_not_fit_the_header_is_refused(tmp_path):
    template = save_image(tmp_path / "memory.save", "<domain/>", data_len=256)
    with pytest.raises(SaveImageError, match="room for 256"):
        write_with_xml(template, tmp_path / "copy.save", "<domain>" + "x" * 400 + "</domain>")
    assert not (tmp_path / "copy.save").exists()


def pool_spec(name: str, state: Path) -> VmSpec:
    return VmSpec(
        name=name,
        job_id="",
        image_path=Path("/img/base.qcow2"),
        image_format=ImageFormat.QCOW2,
        cpus=1,
        memory_mb=256,
        disk_gb=None,
        console_path=state / "logs" / f"{name}.console",
        seed=SeedFiles(b"#!/bin/sh\n", b""),
        direct_boot=DirectBoot(Path("/img/vmlinuz")),
        job_channel=state / "channels" / "x.sock",
    )


def test_a_restored_domain_has_its_own_identity_and_files(tmp_path):
    template_files = DomainFiles(
        overlay=tmp_path / "overlays/pool-t.qcow2",
        seed=tmp_path / "seeds/pool-t.iso",
        console=tmp_path / "logs/pool-t.console",
        channel=tmp_path / "channels/t.sock",
    )
    saved = build_domain_xml(
        pool_spec("pool-t", tmp_path), template_files, domain_type="qemu", orchestrator_id="o", network="net"
    )
    root = ET.fromstring(saved)
    ET.SubElement(root, "uuid").text = "11111111-1111-1111-1111-111111111111"
    ET.SubElement(root.find("devices/interface"), "mac", address="52:54:00:00:00:01")
    ET.SubElement(root.find("devices/interface"), "target", dev="vnet7")
    root.find("genid").text = "22222222-2222-2222-2222-222222222222"
    saved = ET.tostring(root, encoding="unicode")
    mine = DomainFiles(
        overlay=tmp_path / "overlays/pool-r.qcow2",
        seed=None,
        console=tmp_path / "logs/pool-r.console",
        channel=tmp_path / "channels/r.sock",
    )
    restored = [
        rewrite_for_restore(
            saved, name="pool-r", files=mine, template_seed=tmp_path / "t/seed.iso", orchestrator_id="o"
        )
        for _ in range(2)
    ]
    a, b = (ET.fromstring(r.xml) for r in restored)
    assert a.findtext("name") == "pool-r"
    assert len({a.findtext("uuid"), b.findtext("uuid"), "11111111-1111-1111-1111-111111111111"}) == 3
    assert len({a.findtext("genid"), b.findtext("genid"), "22222222-2222-2222-2222-222222222222"}) == 3
    macs = {r.mac_change[1] for r in restored}
    assert all(r.mac_change[0] == "52:54:00:00:00:01" for r in restored) and len(macs) == 2
    assert a.find("devices/interface/target") is None  # libvirt names the new tap device
    sources = {d.get("device"): d.find("source").get("file") for d in a.findall("devices/disk")}
    assert sources == {"disk": str(mine.overlay), "cdrom": str(tmp_path / "t/seed.iso")}
    assert {s.find("source").get("path") for s in a.findall("devices/serial") + a.findall("devices/console")} == {
        str(mine.console)
    }
    assert a.find("devices/channel/source").get("path") == str(mine.channel)
    tag = read_job_tag(restored[0].xml)
    assert tag.pool and tag.orchestrator_id == "o" and tag.console == mine.console and tag.overlay == mine.overlay
    assert len(a.findall(f"metadata/{{{METADATA_NS}}}job")) == 1
