"""Warm pools with real VMs: libvirt + QEMU (software emulation), the tiny test image,
the real broker. Pool VMs are counted from libvirt, faults are real (a domain destroyed,
the daemon SIGKILLed), and after every test no domain, overlay, seed, job port or pool
console of ours is left."""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import libvirt
import pytest
import yaml

from hypervisors.base import BackendName
from hypervisors.guest import new_nonce
from orchestrator.core.imagemap import load_image_map
from orchestrator.core.messages import JobRequest, JobStatus
from orchestrator.host.daemon import Daemon
from orchestrator.host.journal import Journal
from tests.conftest import AMQP_URL, LIBVIRT_URI, make_settings, wait_for
from tests.support.daemonproc import DaemonProcess

pytestmark = pytest.mark.libvirt

BOOT_S = 120  # a pool VM's boot, generously (software emulation on a busy 2-core runner)


def warm_map(test_image: Path, directory: Path, *, ready: int = 1, image_dir: Path | None = None) -> Path:
    document = yaml.safe_load((test_image / "image-map.yaml").read_text())
    demo = document["images"]["demo"]
    demo["warm"] = {"ready": ready}
    if image_dir is not None:
        for key in ("local_path", "kernel", "initrd"):
            demo[key] = str(image_dir / Path(demo[key]).name)
    document["images"] = {"demo": demo}
    path = directory / "warm-map.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def tagged(domain: libvirt.virDomain, orchestrator_id: str) -> bool:
    """Whether a listed domain carries our tag; False for one gone since it was listed
    (the daemon destroys pool VMs while the test looks)."""
    try:
        return f"<orch:orchestrator>{orchestrator_id}<" in domain.XMLDesc(0)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return False
        raise


def ours(orchestrator_id: str) -> list[str]:
    """Our domains (by their tag), as libvirt lists them."""
    conn = libvirt.open(LIBVIRT_URI)
    try:
        return [d.name() for d in conn.listAllDomains(0) if tagged(d, orchestrator_id)]
    finally:
        conn.close()


def active_pool_domains(orchestrator_id: str) -> list[str]:
    conn = libvirt.open(LIBVIRT_URI)
    try:
        return [
            d.name()
            for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
            if d.name().startswith("pool-") and tagged(d, orchestrator_id)
        ]
    finally:
        conn.close()


class PeakOfOurs:
    """The most domains of ours (by tag) libvirt shows active at once, sampled every
    `interval_s` over the test's own connection."""

    def __init__(self, orchestrator_id: str, interval_s: float = 0.1) -> None:
        self.orchestrator_id = orchestrator_id
        self.interval_s = interval_s
        self.peak = 0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> PeakOfOurs:
        self._task = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._task is not None
        if self._task.done():
            self._task.result()
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    def _count(self, conn: libvirt.virConnect) -> int:
        return sum(
            tagged(domain, self.orchestrator_id)
            for domain in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        )

    async def _sample(self) -> None:
        conn = await asyncio.to_thread(libvirt.open, LIBVIRT_URI)
        try:
            while True:
                self.peak = max(self.peak, await asyncio.to_thread(self._count, conn))
                await asyncio.sleep(self.interval_s)
        finally:
            conn.close()


def assert_nothing_left(state_dir: Path, orchestrator_id: str) -> None:
    assert ours(orchestrator_id) == []
    for sub in ("overlays", "seeds", "channels"):
        assert list((state_dir / sub).iterdir()) == [], sub
    assert list((state_dir / "logs").glob("pool-*")) == []


def ready_in_pool(daemon: Daemon) -> int:
    return daemon.pools.status().get("demo", {}).get("ready", 0)


@pytest.fixture
async def warm_daemon(prefix, tmp_path, test_image, test_network, cleanup_topology) -> AsyncIterator[Daemon]:
    cleanup_topology.append("demo")
    map_path = warm_map(test_image, tmp_path)
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
        image_dir=test_image,
    )
    daemon = Daemon(settings, load_image_map(map_path))
    await daemon.start()
    yield daemon
    await daemon.stop()
    assert_nothing_left(settings.state_dir, settings.orchestrator_id)


async def test_a_job_takes_a_warm_vm_within_a_second_and_the_next_boots_cold(warm_daemon, broker):
    orchestrator_id = warm_daemon.settings.orchestrator_id
    await wait_for(lambda: ready_in_pool(warm_daemon) == 1, timeout_s=BOOT_S, interval_s=0.1, what="a ready pool VM")
    [pool_vm] = active_pool_domains(orchestrator_id)
    await broker.open()
    async with PeakOfOurs(orchestrator_id) as domains:
        warm = await broker.submit(runs_on="demo", script="echo warm job on $(hostname)")
        result = await broker.next_result(timeout_s=BOOT_S)
        assert result.status is JobStatus.SUCCEEDED, (result.summary, result.console_tail)
        assert (await warm_daemon.journal.get(warm.job_id)).vm_name == pool_vm
        assert result.timings["to_first_command_s"] < 1.0, result.timings
        assert "warm job on" in warm_daemon.console_path(warm.job_id).read_text(errors="replace")
        # The pool is refilling (a boot takes seconds): the next job boots cold.
        cold = await broker.submit(runs_on="demo", script="echo cold job")
        result = await broker.next_result(timeout_s=BOOT_S)
        assert result.status is JobStatus.SUCCEEDED, (result.summary, result.console_tail)
        assert (await warm_daemon.journal.get(cold.job_id)).vm_name == f"job-{cold.job_id}"
        assert result.timings["to_first_command_s"] > 1.0, result.timings
        assert pool_vm not in ours(orchestrator_id)  # used once
        await wait_for(
            lambda: ready_in_pool(warm_daemon) == 1, timeout_s=BOOT_S, interval_s=0.1, what="the pool to refill"
        )
    # Never more domains than MAX_CONCURRENCY (2), pool VMs included, as libvirt saw them.
    assert domains.peak == 2
    await wait_for(lambda: ready_in_pool(warm_daemon) == 1, timeout_s=BOOT_S, interval_s=0.1, what="the pool to refill")
    assert len(active_pool_domains(orchestrator_id)) == 1


async def test_a_pool_vm_destroyed_from_outside_is_replaced(warm_daemon):
    orchestrator_id = warm_daemon.settings.orchestrator_id
    await wait_for(lambda: ready_in_pool(warm_daemon) == 1, timeout_s=BOOT_S, interval_s=0.1, what="a ready pool VM")
    [victim] = active_pool_domains(orchestrator_id)
    conn = libvirt.open(LIBVIRT_URI)
    try:
        conn.lookupByName(victim).destroy()  # as `virsh destroy` does
    finally:
        conn.close()
    await wait_for(
        lambda: victim not in ours(orchestrator_id), timeout_s=30, interval_s=0.1, what="the dead VM undefined"
    )
    await wait_for(lambda: ready_in_pool(warm_daemon) == 1, timeout_s=BOOT_S, interval_s=0.1, what="a replacement")
    assert warm_daemon.pools.status()["demo"]["failed_total"] == 1
    assert victim not in active_pool_domains(orchestrator_id)


async def test_a_hand_off_that_fails_boots_the_job_cold_with_one_result(warm_daemon, broker):
    await wait_for(lambda: ready_in_pool(warm_daemon) == 1, timeout_s=BOOT_S, interval_s=0.1, what="a ready pool VM")
    await broker.open()
    # An earlier attempt of this job ran on this host: its console is kept, so the pool
    # VM's console cannot take the job's name, and the job boots a VM of its own.
    job_id = str(uuid.uuid4())
    console = warm_daemon.console_path(job_id)
    console.write_text("an earlier attempt's output\n")
    await broker.submit(request_id=job_id, runs_on="demo", script="echo second attempt", attempt=2)
    result = await broker.next_result(timeout_s=BOOT_S)
    assert result.status is JobStatus.SUCCEEDED, (result.summary, result.console_tail)
    text = console.read_text(errors="replace")
    assert text.startswith("an earlier attempt's output\n") and "second attempt" in text
    assert (await warm_daemon.journal.get(job_id)).vm_name == f"job-{job_id}"
    assert warm_daemon.runner.warm_fallbacks == 1
    await asyncio.sleep(0.5)
    assert broker.results.empty() and not broker.conflicts


async def test_a_new_image_file_rebuilds_the_pool(prefix, tmp_path, test_image, test_network, cleanup_topology):
    cleanup_topology.append("demo")
    images = tmp_path / "images"
    images.mkdir()
    for name in ("base.qcow2", "kernel", "initramfs.cpio.gz"):
        shutil.copy(test_image / name, images / name)
    map_path = warm_map(test_image, tmp_path, image_dir=images)
    settings = make_settings(
        prefix,
        tmp_path / "state",
        map_path,
        backend=BackendName.LIBVIRT,
        libvirt_domain_type="qemu",
        libvirt_network=test_network,
        orchestrator_id=f"test-{prefix}",
        image_dir=images,
    )
    daemon = Daemon(settings, load_image_map(map_path))
    await daemon.start()
    try:
        await wait_for(lambda: ready_in_pool(daemon) == 1, timeout_s=BOOT_S, interval_s=0.1, what="a ready pool VM")
        [before] = active_pool_domains(settings.orchestrator_id)
        # A new image installed the way preparation installs one: a new file renamed in.
        shutil.copy(images / "base.qcow2", images / "base.qcow2.new")
        (images / "base.qcow2.new").replace(images / "base.qcow2")
        await wait_for(
            lambda: before not in ours(settings.orchestrator_id),
            timeout_s=30,
            interval_s=0.1,
            what="the pool VM of the old image retired",
        )
        await wait_for(
            lambda: ready_in_pool(daemon) == 1, timeout_s=BOOT_S, interval_s=0.1, what="a pool VM of the new image"
        )
        assert daemon.pools.status()["demo"]["failed_total"] == 0
    finally:
        await daemon.stop()
    assert_nothing_left(settings.state_dir, settings.orchestrator_id)


def warm_daemon_env(
    prefix: str, tmp_path: Path, test_image: Path, test_network: str, state: Path, orchestrator_id: str
) -> dict[str, str]:
    """A daemon process's environment: the warm test map, on libvirt, two jobs at once."""
    return {
        "AMQP_URL": AMQP_URL,
        "AMQP_PREFIX": prefix,
        "ORCH_CONFIG": str(warm_map(test_image, tmp_path)),
        "STATE_DIR": str(state),
        "HOST_NAME": "h",
        "HOST_CPUS": "4",
        "HOST_MEMORY_MB": "2048",
        "DRAIN_TIMEOUT_S": "5",
        "HTTP_LISTEN": "off",
        "ORCH_BACKEND": "libvirt",
        "LIBVIRT_DOMAIN_TYPE": "qemu",
        "LIBVIRT_NETWORK": test_network,
        "ORCH_ID": orchestrator_id,
        "IMAGE_DIR": str(test_image),
        "MAX_CONCURRENCY": "2",
    }


@contextlib.asynccontextmanager
async def daemon_processes(
    env: dict[str, str], orchestrator_id: str
) -> AsyncIterator[Callable[[], Awaitable[DaemonProcess]]]:
    """Starts daemon processes with `env` (as many as the test asks for); at the end
    every one still running is killed, what a killed one left of ours is destroyed, and
    (when the test passed) nothing of ours may be left."""
    started: list[DaemonProcess] = []

    async def start() -> DaemonProcess:
        started.append(await DaemonProcess(env).start())
        return started[-1]

    try:
        yield start
    finally:
        for daemon in started:
            await daemon.kill()
        # A clean stop destroys the pool; after a kill or a failure, what is left goes here.
        leftovers = ours(orchestrator_id)
        destroy_domains(leftovers)
    assert leftovers == []


async def test_sigkill_with_an_assigned_and_an_idle_pool_vm(
    prefix, tmp_path, test_image, test_network, cleanup_topology, broker
):
    """The job's pool VM is adopted and its result collected; the idle pool VM of the
    killed daemon is destroyed and a fresh one boots."""
    cleanup_topology.append("demo")
    state = tmp_path / "state"
    orchestrator_id = f"test-{prefix}"
    env = warm_daemon_env(prefix, tmp_path, test_image, test_network, state, orchestrator_id)
    async with daemon_processes(env, orchestrator_id) as start:
        first = await start()
        await wait_for(lambda: first.events("pool.vm_ready"), timeout_s=BOOT_S, interval_s=0.1, what="a ready pool VM")
        await broker.open()
        job = await broker.submit(runs_on="demo", script="echo started; sleep 8; echo finished")
        await wait_for(lambda: first.events("job.handed_over"), timeout_s=30, interval_s=0.05, what="the hand-off")
        [assigned] = [e["vm"] for e in first.events("job.handed_over")]
        # The pool refills at once: an idle pool VM (booting or ready) besides the job's.
        await wait_for(
            lambda: len(first.events("pool.vm_booting")) == 2, timeout_s=30, interval_s=0.05, what="a refill"
        )
        idle = first.events("pool.vm_booting")[1]["vm"]
        await first.kill()
        assert {assigned, idle} <= set(ours(orchestrator_id))  # both outlive the daemon
        second = await start()
        result = await broker.next_result(timeout_s=BOOT_S)
        assert result.request_id == job.request_id
        assert result.status is JobStatus.SUCCEEDED and result.attempt == 1, (result.summary, result.console_tail)
        assert "finished" in (state / "logs" / f"{job.job_id}.console").read_text(errors="replace")
        destroyed = {e["vm"] for e in second.events("reconcile.destroyed_orphan_vm")}
        assert idle in destroyed and assigned not in destroyed
        await wait_for(lambda: second.events("pool.vm_ready"), timeout_s=BOOT_S, interval_s=0.1, what="a fresh pool VM")
        assert second.events("pool.vm_ready")[0]["vm"] not in (assigned, idle)
        assert await second.stop() == 0
        await asyncio.sleep(0.5)
        assert broker.results.empty() and not broker.conflicts
    assert sorted(p.name for p in (state / "channels").iterdir()) == []


async def test_a_job_journaled_to_a_pool_vm_but_not_handed_over_is_handed_back(
    prefix, tmp_path, test_image, test_network, cleanup_topology, broker
):
    """SIGKILL between the intake's journal commit ("job J -> pool VM V") and the hand-off:
    the next start finds V waiting, its console without J's start line, so V is destroyed
    and J handed back as its next attempt, which runs once."""
    cleanup_topology.append("demo")
    state = tmp_path / "state"
    orchestrator_id = f"test-{prefix}"
    env = warm_daemon_env(prefix, tmp_path, test_image, test_network, state, orchestrator_id)
    async with daemon_processes(env, orchestrator_id) as start:
        first = await start()
        await wait_for(lambda: first.events("pool.vm_ready"), timeout_s=BOOT_S, interval_s=0.1, what="a ready pool VM")
        pool_vm = first.events("pool.vm_ready")[0]["vm"]
        await first.kill()
        # What the intake had committed when the kill came: the job, and its pool VM.
        request = JobRequest(
            request_id=uuid.uuid4(),
            runs_on="demo",
            repo_url="https://example.invalid/r.git",
            commit_sha="0" * 40,
            script="echo ran",
        )
        journal = Journal(state / "state.db")
        assert await journal.accept(
            request, label="demo", nonce=new_nonce(), vm_name=pool_vm, backend="libvirt", accepted_at=time.time()
        )
        await journal.close()
        await broker.open()
        second = await start()
        result = await broker.next_result(timeout_s=BOOT_S)
        assert result.request_id == request.request_id
        assert (result.status, result.attempt) == (JobStatus.SUCCEEDED, 2), (result.summary, result.console_tail)
        assert pool_vm not in ours(orchestrator_id)
        assert [e["reason"] for e in second.events("job.requeued")] == [
            "its pool VM had not been given the job when the daemon stopped"
        ]
        assert await second.stop() == 0
        await asyncio.sleep(0.5)
        assert broker.results.empty() and not broker.conflicts


def destroy_domains(names: list[str]) -> None:
    conn = libvirt.open(LIBVIRT_URI)
    try:
        for name in names:
            domain = conn.lookupByName(name)
            if domain.isActive():
                domain.destroy()
            domain.undefine()
    finally:
        conn.close()


def domain_xml(name: str) -> str:
    conn = libvirt.open(LIBVIRT_URI)
    try:
        return conn.lookupByName(name).XMLDesc(0)
    finally:
        conn.close()


RESEEDED_BY_KERNEL = "orchestrator: RNG reseeded by the kernel (vmgenid)"
MIXED_ONLY = (
    "orchestrator: host entropy mixed in; the kernel reseeds at its next interval (no vmgenid, perl or python3)"
)


@pytest.mark.parametrize("vmgenid", [True, False], ids=["vmgenid", "no-vmgenid"])
async def test_snapshot_restored_vms_run_jobs_each_with_its_own_identity(
    prefix, tmp_path, test_image, test_network, cleanup_topology, broker, vmgenid
):
    """Each restored copy gets its own UUID, MAC and RNG state. With vmgenid the kernel
    reseeds as the copy starts: the job reads fresh random bytes at once and nothing is
    started for it. Without (the driver kept from loading; the test image has no perl
    or python3 either), the host's entropy is mixed in and the kernel reseeds at its
    next interval, which the job waits out."""
    cleanup_topology.append("demo")
    map_path = warm_map(test_image, tmp_path, ready=2)
    document = yaml.safe_load(map_path.read_text())
    document["images"]["demo"]["warm"]["snapshot"] = True
    if not vmgenid:
        document["images"]["demo"]["cmdline"] += " initcall_blacklist=vmgenid_driver_init"
    map_path.write_text(yaml.safe_dump(document))
    settings = make_settings(
        prefix,
        tmp_path / "state",
        map_path,
        backend=BackendName.LIBVIRT,
        max_concurrency=3,
        host_cpus=4,
        host_memory_mb=2048,
        libvirt_domain_type="qemu",
        libvirt_network=test_network,
        orchestrator_id=f"test-{prefix}",
        image_dir=test_image,
    )
    daemon = Daemon(settings, load_image_map(map_path))
    await daemon.start()
    try:
        await wait_for(
            lambda: ready_in_pool(daemon) == 2, timeout_s=2 * BOOT_S, interval_s=0.1, what="2 restored pool VMs"
        )
        [template] = list(settings.state.templates.iterdir())
        assert {p.name for p in template.iterdir()} == {"memory.save", "disk.qcow2", "seed.iso"}
        names = active_pool_domains(settings.orchestrator_id)
        xmls = [domain_xml(name) for name in names]
        identities = [
            (re.search(r"<uuid>(.*?)</uuid>", x).group(1), re.search(r"<mac address='(.*?)'", x).group(1)) for x in xmls
        ]
        assert (
            len(set(identities)) == 2 and len({u for u, _ in identities}) == 2 and len({m for _, m in identities}) == 2
        )
        await broker.open()
        # Without vmgenid: past the guest's own reseed interval.
        wait = "" if vmgenid else "sleep 5; "
        script = f"{wait}cat /sys/class/net/eth0/address; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo"
        jobs = [await broker.submit(runs_on="demo", script=script) for _ in range(2)]
        results = await broker.collect(2, timeout_s=BOOT_S)
        assert all(r.status is JobStatus.SUCCEEDED for r in results.values()), [r.summary for r in results.values()]
        seen = {}
        for job in jobs:
            record = await daemon.journal.get(job.job_id)
            assert record.vm_name in names
            lines = daemon.console_path(job.job_id).read_text(errors="replace").splitlines()
            at = next(i for i, line in enumerate(lines) if line.startswith("ORCH-STARTED"))
            mac, random_hex = lines[at + 1].strip(), lines[at + 2].strip()
            said = [line.strip() for line in lines[:at] if line.startswith("orchestrator: ")]
            assert said[-1:] == [RESEEDED_BY_KERNEL if vmgenid else MIXED_ONLY], said
            assert (
                mac == dict(zip(names, (m for _, m in identities), strict=True))[record.vm_name]
            )  # the guest took its own MAC
            seen[job.job_id] = random_hex
            assert results[job.job_id].timings["to_first_command_s"] < 1.0, results[job.job_id].timings
        assert len(set(seen.values())) == 2, seen
    finally:
        await daemon.stop()
    assert_nothing_left(settings.state_dir, settings.orchestrator_id)
    assert list(settings.state.templates.iterdir()) == []
