"""Real VMs under libvirt + QEMU (software emulation), the tiny test image, the real
broker, through the daemon. After every test no domain, overlay or seed of ours is left."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator, Collection
from pathlib import Path
from typing import Self

import libvirt
import pytest

from hypervisors.base import BackendError, BackendName
from hypervisors.libvirt.backend import LibvirtHypervisor
from orchestrator.core.imagemap import load_image_map
from orchestrator.core.messages import JobStatus
from orchestrator.host.daemon import Daemon
from tests.conftest import LIBVIRT_URI, make_settings, wait_for

pytestmark = pytest.mark.libvirt


@pytest.fixture
async def vm_daemon(prefix, tmp_path, test_image, test_network, cleanup_topology) -> AsyncIterator[Daemon]:
    cleanup_topology.extend(["demo", "demo-silent"])
    map_path = test_image / "image-map.yaml"
    settings = make_settings(
        prefix,
        tmp_path / "state",
        map_path,
        backend=BackendName.LIBVIRT,
        max_concurrency=2,
        libvirt_domain_type="qemu",
        libvirt_network=test_network,
        orchestrator_id=f"test-{prefix}",
        host_cpus=4,
        host_memory_mb=2048,
        console_max_bytes=4 * 1024 * 1024,
        image_dir=test_image,
    )
    daemon = Daemon(settings, load_image_map(map_path))
    await daemon.start()
    yield daemon
    await daemon.stop()
    # Nothing of ours may be left behind.
    conn = libvirt.open(LIBVIRT_URI)
    try:
        names = [d.name() for d in conn.listAllDomains(0)]
    finally:
        conn.close()
    assert not [n for n in names if n.startswith("job-")], names
    assert list((settings.state_dir / "overlays").iterdir()) == []
    assert list((settings.state_dir / "seeds").iterdir()) == []


def _active_domains(conn: libvirt.virConnect) -> set[str]:
    return {d.name() for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)}


class ActiveDomains:
    """How many of the domains `names` libvirt shows active at once, sampled every
    `interval_s` over a connection of the test's own: `peak` is the most seen."""

    def __init__(self, names: Collection[str], interval_s: float = 0.1) -> None:
        self.names = set(names)
        self.interval_s = interval_s
        self.peak = 0
        self.samples = 0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._sample(), name="sample-active-domains")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._task is not None
        if self._task.done():
            self._task.result()  # a sampler that died fails the test
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _sample(self) -> None:
        conn = await asyncio.to_thread(libvirt.open, LIBVIRT_URI)
        try:
            while True:
                active = await asyncio.to_thread(_active_domains, conn)
                self.peak = max(self.peak, len(active & self.names))
                self.samples += 1
                await asyncio.sleep(self.interval_s)
        finally:
            conn.close()


async def test_a_guest_printing_without_end_keeps_a_bounded_console_and_its_result(vm_daemon, broker):
    await broker.open()
    job = await broker.submit(
        runs_on="demo",
        script="echo first line; yes 'yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy' | head -c 7000000; echo; echo last line",
    )  # 1.7x the cap: cut once, ~20 s of emulated serial port
    result = await broker.next_result(timeout_s=300)
    assert result.status is JobStatus.SUCCEEDED and result.exit_code == 0, (result.summary, result.console_tail)
    console = vm_daemon.console_path(job.job_id)
    data = console.read_bytes()
    assert len(data) <= 4 * 1024 * 1024
    assert b"first line" in data[: 1024 * 1024] and b"last line" in data[-4096:]
    assert b"bytes of console output cut here" in data
    assert oct(console.stat().st_mode & 0o777) == oct(0o640)


async def test_jobs_exiting_0_and_3_run_at_once_in_real_vms(vm_daemon, broker):
    await broker.open()
    ok_id, bad_id = str(uuid.uuid4()), str(uuid.uuid4())
    async with ActiveDomains({f"job-{ok_id}", f"job-{bad_id}"}) as domains:
        ok = await broker.submit(
            request_id=ok_id,
            runs_on="demo",
            script="echo hello from $GREETING; uname -s",
            env={"GREETING": "the VM's shell"},
        )
        bad = await broker.submit(request_id=bad_id, runs_on="demo", script="echo about to fail; exit 3")
        results = await broker.collect(2, timeout_s=240)
    assert domains.samples > 10 and domains.peak == 2  # seen by libvirt: both VMs ran at once
    assert results[ok.job_id].status is JobStatus.SUCCEEDED and results[ok.job_id].exit_code == 0
    assert results[bad.job_id].status is JobStatus.FAILED and results[bad.job_id].exit_code == 3
    log = (vm_daemon.console_path(ok.job_id)).read_text()
    assert "hello from the VM's shell" in log and "Linux" in log
    assert f"NoCloud seed on /dev/sr0: {ok.job_id}" in log


async def test_script_that_never_ends_times_out_and_vm_is_destroyed(vm_daemon, broker):
    await broker.open()
    job = await broker.submit(runs_on="demo", script="echo started; while true; do sleep 1; done", timeout_s=15)
    result = await broker.next_result(timeout_s=120)
    assert result.request_id == job.request_id
    assert result.status is JobStatus.TIMEOUT
    assert "started" in result.console_tail
    assert await vm_daemon.router.list_ours() == []


async def test_vm_that_never_prints_a_result_line_is_an_error_with_console_tail(vm_daemon, broker):
    await broker.open()
    await broker.submit(runs_on="demo-silent", script="echo never runs")
    result = await broker.next_result(timeout_s=120)
    assert result.status is JobStatus.ERROR
    assert "without reporting a result" in result.summary
    assert "skipping user-data" in result.console_tail and "never runs" not in result.console_tail


async def test_network_is_made_active_and_autostarted(tmp_path, test_network):
    conn = libvirt.open(LIBVIRT_URI)
    network = conn.networkLookupByName(test_network)
    if network.isActive():
        network.destroy()
    network.setAutostart(0)
    backend = await LibvirtHypervisor.connect(
        uri=LIBVIRT_URI, network=test_network, domain_type="qemu", state_dir=tmp_path, orchestrator_id="t"
    )
    await backend.close()
    assert network.isActive() and network.autostart()
    conn.close()


async def test_missing_network_is_a_clear_error(tmp_path):
    with pytest.raises(
        BackendError, match=r"libvirt network 'no-such-net' does not exist \(define it .* LIBVIRT_NETWORK=none"
    ):
        await LibvirtHypervisor.connect(
            uri=LIBVIRT_URI, network="no-such-net", domain_type="qemu", state_dir=tmp_path, orchestrator_id="t"
        )


LIBVIRTD_PID_FILE = Path("/run/libvirtd.pid")


def _running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie no init has reaped yet is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


async def _virsh_answers() -> bool:
    virsh = await asyncio.create_subprocess_exec(
        "virsh", "-c", LIBVIRT_URI, "version", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return await virsh.wait() == 0


async def _restart_libvirtd() -> None:
    """Stop the libvirtd named in its pid file and start it again, as
    scripts/bootstrap-host.sh does: no other libvirtd on the (shared) host is signalled,
    and none is started while that one still runs (it would delete the live socket)."""
    pid = int(LIBVIRTD_PID_FILE.read_text())
    os.kill(pid, signal.SIGTERM)
    await wait_for(
        lambda: not _running(pid), timeout_s=30, interval_s=0.1, what=f"libvirtd (pid {pid}) to exit on SIGTERM"
    )
    started = await asyncio.create_subprocess_exec("libvirtd", "-d")
    assert await started.wait() == 0
    await wait_for(_virsh_answers, timeout_s=30, interval_s=0.1, what="the new libvirtd to answer `virsh version`")


async def test_libvirtd_restart_mid_job_is_survived(vm_daemon, broker):
    await broker.open()
    job = await broker.submit(runs_on="demo", script="echo before; sleep 12; echo after")
    console = vm_daemon.console_path(job.job_id)
    await wait_for(
        lambda: console.exists() and "before" in console.read_text(errors="replace"),
        timeout_s=60,
        interval_s=0.1,
        what="the guest to print 'before'",
    )
    await _restart_libvirtd()
    result = await broker.next_result(timeout_s=180)
    assert result.request_id == job.request_id
    assert result.status is JobStatus.SUCCEEDED, (result.summary, result.console_tail)
    assert "after" in console.read_text()
    backend = vm_daemon.router.backends[BackendName.LIBVIRT]
    assert backend.connection.reconnects >= 1
