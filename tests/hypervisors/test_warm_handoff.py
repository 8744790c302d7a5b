"""Warm pools, first step: a VM boots before its job exists, with the waiter as its
user-data and a job port (virtio-serial on a unix socket); the job handed over later
runs exactly like a cold job (console, result line, power off). Real libvirt + QEMU."""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from hypervisors.base import DirectBoot, ImageFormat, SeedFiles, VmSpec, VmState
from hypervisors.guest import build_meta_data, build_user_data, find_exit_code, new_nonce
from hypervisors.handoff import HandOffError, job_payload, waiter_user_data
from hypervisors.statedir import StateDir
from tests.conftest import LIBVIRT_URI

pytestmark = pytest.mark.libvirt


def test_the_payload_sets_the_clock_and_seed_before_the_job():
    payload = job_payload(b"#!/bin/sh\necho job\n", now=1_700_000_000, seed=b"\x01\x02")
    assert payload.startswith(b"#!/bin/sh\ndate -u -s @1700000000")
    assert b"printf %s 0102 >/dev/urandom" in payload and payload.endswith(b"echo job\n")
    assert payload.count(b"#!/bin/sh") == 1


async def test_a_pool_vm_waits_then_runs_the_job_handed_to_it(test_image, test_network):
    from hypervisors.libvirt.backend import LibvirtHypervisor

    state = Path(tempfile.mkdtemp(prefix="w", dir="/tmp"))  # short: a unix socket's path has 108 bytes
    backend = await LibvirtHypervisor.connect(
        uri=LIBVIRT_URI,
        network=test_network,
        domain_type="qemu",
        state_dir=state,
        orchestrator_id=f"test-{uuid.uuid4().hex[:8]}",
    )
    pool = f"pool-{uuid.uuid4()}"
    boot = DirectBoot(test_image / "kernel", test_image / "initramfs.cpio.gz", "console=ttyS0 panic=-1 quiet")
    spec = VmSpec(
        name=pool,
        job_id="",
        image_path=test_image / "base.qcow2",
        image_format=ImageFormat.QCOW2,
        cpus=1,
        memory_mb=256,
        disk_gb=None,
        console_path=state / "logs" / f"{pool}.console",
        seed=SeedFiles(waiter_user_data(vm_name=pool), build_meta_data(job_id=pool, hostname="pool")),
        direct_boot=boot,
        job_channel=StateDir(state).channel(pool),
    )
    job_id, nonce = str(uuid.uuid4()), new_nonce()
    user_data = build_user_data(
        job_id=job_id,
        nonce=nonce,
        env={"WHO": "a warm VM"},
        repo_url=None,
        commit_sha=None,
        checkout=False,
        script="echo hello from $WHO; exit 4",
        script_path=None,
    )
    job = VmSpec(
        name=pool,
        job_id=job_id,
        image_path=None,
        image_format=None,
        cpus=1,
        memory_mb=256,
        disk_gb=None,
        console_path=spec.console_path,
        seed=SeedFiles(user_data, b""),
        nonce=nonce,
    )
    try:
        await backend.prepare(spec)
        await backend.start(spec)
        started = time.monotonic()
        await backend.hand_over(spec, job, ready_timeout_s=120)
        assert await backend.wait_stopped(spec) is VmState.STOPPED
        console = spec.console_path.read_text(errors="replace")
        assert "is waiting for a job" in console and "hello from a warm VM" in console
        assert find_exit_code(console, nonce) == 4
        assert time.monotonic() - started < 120
    finally:
        await backend.destroy(spec)
        assert not spec.job_channel.exists() and not StateDir(state).overlay(pool).exists()
        await backend.close()
        shutil.rmtree(state)


async def test_a_vm_without_a_job_port_refuses_a_hand_over(tmp_path):
    from hypervisors.handoff import hand_over

    with pytest.raises(HandOffError, match=r"cannot reach the VM's job port|did not say it was ready"):
        await hand_over(tmp_path / "no.sock", b"x", ready_timeout_s=0.3)
