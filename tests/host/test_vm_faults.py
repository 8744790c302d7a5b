"""Hypervisor faults: a VM that will not start, a full disk while creating its overlay,
and a guest that never prints anything (boot timeout). Each gives one error result and
leaves no VM or file behind."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from hypervisors.base import BackendName
from orchestrator.core.imagemap import parse_image_map
from orchestrator.core.messages import JobRequest, JobStatus
from orchestrator.host.daemon import Daemon
from orchestrator.host.runner import job_timeout_s
from tests.conftest import TEST_IMAGE, make_settings


def image_dir(tmp_path: Path) -> Path:
    """The test image's files, hard-linked into a directory of the test's own, so a
    broken file of the test can sit beside them inside IMAGE_DIR."""
    images = tmp_path / "images"
    if not images.exists():
        images.mkdir()
        for name in ("base.qcow2", "kernel", "initramfs.cpio.gz"):
            os.link(TEST_IMAGE / name, images / name)
    return images


def broken_map(tmp_path: Path, **image: str) -> str:
    images = image_dir(tmp_path)
    entries = {
        "backend": "libvirt",
        "local_path": str(images / "base.qcow2"),
        "format": "qcow2",
        "checkout": "false",
        "memory_mb": "256",
        "kernel": str(images / "kernel"),
        "initrd": str(images / "initramfs.cpio.gz"),
        "cmdline": "console=ttyS0 panic=-1 quiet",
        **image,
    }
    body = "".join(f"    {k}: {v}\n" for k, v in entries.items())
    return f"default_label: alpha\nimages:\n  alpha:\n{body}"


@pytest.fixture
def tiny_disk(tmp_path) -> Iterator[Path]:
    state = tmp_path / "state"
    overlays = state / "overlays"
    overlays.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(overlays)], check=True)
    yield state
    subprocess.run(["umount", str(overlays)], check=True)


async def run_one(tmp_path, prefix, network, text: str, state: Path, broker, **job) -> tuple[Daemon, object]:
    image_map = parse_image_map(text, filename="map.yaml", base_dir=tmp_path)
    settings = make_settings(
        prefix,
        state,
        tmp_path / "map.yaml",
        backend=BackendName.LIBVIRT,
        image_dir=image_dir(tmp_path),
        libvirt_domain_type="qemu",
        libvirt_network=network,
        orchestrator_id=f"t-{prefix}",
    )
    daemon = Daemon(settings, image_map)
    await daemon.start()
    try:
        await broker.open()
        await broker.submit(runs_on="alpha", script="echo hi", **job)
        result = await broker.next_result(timeout_s=120)
        assert await daemon.runner.wait_idle(30)  # the result goes out before the clean-up
        assert await daemon.router.list_ours() == []
    finally:
        await daemon.stop()
    assert [p for p in (state / "overlays").iterdir()] == []
    assert [p for p in (state / "seeds").iterdir()] == []
    return daemon, result


@pytest.mark.libvirt
async def test_vm_that_fails_to_start_is_an_error_and_leaks_nothing(
    tmp_path, prefix, test_network, cleanup_topology, broker
):
    not_a_kernel = image_dir(tmp_path) / "not-a-kernel"
    not_a_kernel.write_text("this is not a kernel\n")
    text = broken_map(tmp_path, kernel=str(not_a_kernel))
    _, result = await run_one(tmp_path, prefix, test_network, text, tmp_path / "state", broker)
    assert result.status is JobStatus.ERROR and result.summary.startswith("VM failed to start: VM job-")


@pytest.mark.libvirt
async def test_full_disk_while_creating_the_overlay_is_an_error(
    tmp_path, prefix, test_network, tiny_disk, cleanup_topology, broker
):
    _, result = await run_one(tmp_path, prefix, test_network, broken_map(tmp_path, disk_gb="2"), tiny_disk, broker)
    assert result.status is JobStatus.ERROR
    assert "No space left on device" in result.summary


async def test_silent_guest_hits_the_boot_timeout(daemon_factory, broker):
    daemon = await daemon_factory(boot_timeout_s=1.0)
    await broker.open()
    await broker.submit(runs_on="alpha", env={"NOOP_FAIL": "hang"}, timeout_s=60)
    result = await broker.next_result(timeout_s=20)
    assert result.status is JobStatus.ERROR
    assert result.summary == "boot timeout: no console output within 1 s; the VM was destroyed"
    assert await daemon.runner.wait_idle(10)
    assert await daemon.router.list_ours() == []


async def test_guest_that_prints_is_not_a_boot_timeout(daemon_factory, broker):
    await daemon_factory(boot_timeout_s=1.0)
    await broker.open()
    await broker.submit(runs_on="alpha", env={"NOOP_FAIL": "hang", "NOOP_OUTPUT": "booting..."}, timeout_s=3)
    result = await broker.next_result(timeout_s=20)
    assert result.status is JobStatus.TIMEOUT and "booting..." in result.console_tail


def test_timeout_is_request_else_image_else_host_capped_by_image(tmp_path):
    text = (
        "default_label: a\nimages:\n  a: {backend: noop, local_path: /x, timeout_s: 600, max_timeout_s: 900}\n"
        "  b: {backend: noop, local_path: /y}\n"
    )
    image_map = parse_image_map(text, filename="m", base_dir=tmp_path)

    def timeout(label: str, **request) -> int:
        job = JobRequest(request_id=uuid.uuid4(), repo_url="https://x/y", commit_sha="a" * 40, **request)
        return job_timeout_s(job, image_map.images[label], default_timeout_s=1200)

    assert timeout("a") == 600
    assert timeout("a", timeout_s=60) == 60
    assert timeout("a", timeout_s=5000) == 900
    assert timeout("b") == 1200
