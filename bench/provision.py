"""Provisioning benchmark on real libvirt + QEMU (software emulation), tiny test image.

In one run, each over --runs runs (p50/p95):
(a) floor: `qemu-img create` of an overlay alone, plus libvirt define+start of a
    pre-made domain (XML built before the clock starts);
(b) ours: LibvirtHypervisor.prepare + start (overlay + seed ISO + XML + define + start,
    until the domain runs);
(c) `virt-install --import --cloud-init` doing the same (overlay made beforehand).
Then boot-to-result of the test image (start → the guest powered off after printing its
result line) and our host-side overhead around it (provision + teardown).
Run: .venv/bin/python bench/provision.py  (after bash scripts/bootstrap-host.sh)
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import libvirt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hypervisors.base import DirectBoot, ImageFormat, SeedFiles, VmSpec
from hypervisors.guest import build_meta_data, build_user_data, find_exit_code, new_nonce
from hypervisors.libvirt.backend import LibvirtHypervisor
from hypervisors.libvirt.domain import DomainFiles, build_domain_xml

IMAGE = Path("/var/cache/orchestrator/test-image")
URI = "qemu:///system"
CMDLINE = "console=ttyS0 panic=-1 quiet"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def fmt(values: list[float]) -> str:
    return f"p50 {pct(values, 0.5) * 1000:7.1f} ms  p95 {pct(values, 0.95) * 1000:7.1f} ms"


def make_spec(state: Path) -> VmSpec:
    job = str(uuid.uuid4())
    nonce = new_nonce()
    user_data = build_user_data(
        job_id=job,
        nonce=nonce,
        env={},
        repo_url=None,
        commit_sha=None,
        checkout=False,
        script="echo bench",
        script_path=None,
    )
    return VmSpec(
        name=f"job-{job}",
        job_id=job,
        image_path=IMAGE / "base.qcow2",
        image_format=ImageFormat.QCOW2,
        cpus=1,
        memory_mb=256,
        disk_gb=None,
        console_path=state / "logs" / f"{job}.console",
        seed=SeedFiles(user_data, build_meta_data(job_id=job, hostname="bench")),
        direct_boot=DirectBoot(IMAGE / "kernel", IMAGE / "initramfs.cpio.gz", CMDLINE),
        nonce=nonce,
    )


def qemu_img_overlay(path: Path) -> None:
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(IMAGE / "base.qcow2"), str(path)],
        check=True,
    )


def remove_domain(conn: libvirt.virConnect, name: str) -> None:
    try:
        domain = conn.lookupByName(name)
    except libvirt.libvirtError:
        return
    if domain.isActive():
        domain.destroy()
    domain.undefine()


async def floor(state: Path, runs: int) -> tuple[list[float], list[float]]:
    conn = libvirt.open(URI)
    qemu_img, define_start = [], []
    for _ in range(runs):
        spec = make_spec(state)
        overlay = state / "overlays" / f"{spec.name}.qcow2"
        t0 = time.perf_counter()
        qemu_img_overlay(overlay)
        qemu_img.append(time.perf_counter() - t0)
        xml = build_domain_xml(
            spec,
            DomainFiles(overlay, None, spec.console_path),
            domain_type="qemu",
            orchestrator_id="bench",
            network=None,
        )
        t0 = time.perf_counter()
        try:
            conn.defineXML(xml).create()
            define_start.append(time.perf_counter() - t0)
        finally:  # a start that fails (a missing kernel file) leaves the definition
            remove_domain(conn, spec.name)
            overlay.unlink()
    conn.close()
    return qemu_img, define_start


async def ours(state: Path, runs: int, backend: LibvirtHypervisor) -> list[float]:
    times = []
    for _ in range(runs):
        spec = make_spec(state)
        t0 = time.perf_counter()
        try:
            await backend.prepare(spec)
            await backend.start(spec)
            times.append(time.perf_counter() - t0)
        finally:
            await backend.destroy(spec)
    return times


def virt_install(state: Path, runs: int) -> list[float]:
    conn = libvirt.open(URI)
    times = []
    user_data = state / "user-data"
    user_data.write_text("#!/bin/sh\necho bench\n")
    for _ in range(runs):
        name = f"bench-vi-{uuid.uuid4().hex[:8]}"
        overlay = state / "overlays" / f"{name}.qcow2"
        qemu_img_overlay(overlay)
        t0 = time.perf_counter()
        subprocess.run(
            [
                "virt-install",
                "--connect",
                URI,
                "--name",
                name,
                "--memory",
                "256",
                "--vcpus",
                "1",
                "--import",
                "--disk",
                f"path={overlay},format=qcow2,bus=virtio",
                "--cloud-init",
                f"user-data={user_data}",
                "--virt-type",
                "qemu",
                "--network",
                "none",
                "--boot",
                f"kernel={IMAGE / 'kernel'},initrd={IMAGE / 'initramfs.cpio.gz'},kernel_args={CMDLINE}",
                "--osinfo",
                "detect=on,require=off",
                "--graphics",
                "none",
                "--serial",
                f"file,path={state / 'logs' / (name + '.console')}",
                "--noautoconsole",
                "--noreboot",
            ],
            check=True,
            capture_output=True,
        )
        times.append(time.perf_counter() - t0)
        remove_domain(conn, name)
        overlay.unlink(missing_ok=True)
    # virt-install defines a storage pool for every directory it saw a disk or seed in.
    for pool in conn.listAllStoragePools(0):
        if str(state) in pool.XMLDesc(0):
            if pool.isActive():
                pool.destroy()
            pool.undefine()
    conn.close()
    return times


async def boot_to_result(state: Path, runs: int, backend: LibvirtHypervisor) -> tuple[list[float], list[float]]:
    boots, overheads = [], []
    for _ in range(runs):
        spec = make_spec(state)
        t0 = time.perf_counter()
        try:
            await backend.prepare(spec)
            await backend.start(spec)
            t1 = time.perf_counter()
            await backend.wait_stopped(spec)
            t2 = time.perf_counter()
            assert find_exit_code(spec.console_path.read_text(), spec.nonce) == 0
        finally:
            await backend.destroy(spec)
        t3 = time.perf_counter()
        boots.append(t2 - t1)
        overheads.append((t1 - t0) + (t3 - t2))
    return boots, overheads


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--boots", type=int, default=5)
    args = parser.parse_args()
    subprocess.run(
        [sys.executable, str(Path(__file__).resolve().parent.parent / "examples/test-image/build.py"), str(IMAGE)],
        check=True,
        capture_output=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        for sub in ("overlays", "seeds", "logs"):
            (state / sub).mkdir()
        backend = await LibvirtHypervisor.connect(
            uri=URI, network=None, domain_type="qemu", state_dir=state, orchestrator_id="bench"
        )
        qemu_img, define_start = await floor(state, args.runs)
        floor_total = [a + b for a, b in zip(qemu_img, define_start, strict=True)]
        mine = await ours(state, args.runs, backend)
        vi = virt_install(state, args.runs)
        boots, overheads = await boot_to_result(state, args.boots, backend)
        await backend.close()
    print(f"(a) floor qemu-img create:               {fmt(qemu_img)}")
    print(f"(a) floor define+start prepared domain:  {fmt(define_start)}")
    print(f"(a) floor total:                         {fmt(floor_total)}")
    print(
        f"(b) ours overlay+seed+XML+define+start:  {fmt(mine)}   = {pct(mine, 0.5) / pct(floor_total, 0.5):.2f}x floor at p50"
    )
    print(f"(c) virt-install --import --cloud-init:  {fmt(vi)}   = {pct(vi, 0.5) / pct(mine, 0.5):.1f}x ours at p50")
    print(f"boot-to-result of the test image:        {fmt(boots)}")
    print(
        f"our host-side overhead (provision+teardown): {fmt(overheads)}  = {pct(overheads, 0.5) / pct(boots, 0.5) * 100:.1f}% of boot-to-result"
    )


if __name__ == "__main__":
    asyncio.run(main())
