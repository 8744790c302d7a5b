"""Faults: daemon killed (SIGKILL) mid-job and with work queued, host "reboot", and
reconciliation that touches only what is ours. Each asserts one result per job and no
leaked VMs or files."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import uuid
from pathlib import Path

import pytest

from hypervisors.base import BackendName, VmSpec
from hypervisors.noop import NoopHypervisor
from orchestrator.core.imagemap import load_image_map
from orchestrator.core.messages import JobStatus
from orchestrator.host.daemon import Daemon
from tests.conftest import AMQP_URL, LIBVIRT_URI, make_settings, wait_for
from tests.support.amqpproxy import BASIC_ACK
from tests.support.daemonproc import DaemonProcess
from tests.support.fakes.counting_noop import CountingNoop


def daemon_env(prefix: str, state: Path, config: Path, **extra: str) -> dict[str, str]:
    return {
        "AMQP_URL": AMQP_URL,
        "AMQP_PREFIX": prefix,
        "ORCH_CONFIG": str(config),
        "STATE_DIR": str(state),
        "HOST_NAME": "h",
        "HOST_CPUS": "8",
        "HOST_MEMORY_MB": "8192",
        "DRAIN_TIMEOUT_S": "5",
        "HTTP_LISTEN": "off",
        **extra,
    }


async def test_sigkill_with_jobs_running_and_queued_runs_each_exactly_once(
    prefix, tmp_path, noop_map_path, cleanup_topology, broker
):
    env = daemon_env(prefix, tmp_path / "state", noop_map_path, ORCH_BACKEND="noop", MAX_CONCURRENCY="2")
    first = await DaemonProcess(env).start()
    await broker.open()
    jobs = [await broker.submit(runs_on="alpha", env={"NOOP_DURATION_S": "0.3"}) for _ in range(12)]
    early = await broker.collect(3, timeout_s=30)
    await first.kill()
    second = await DaemonProcess(env).start()
    rest = await broker.collect(12 - len(early), timeout_s=60)
    assert not set(early) & set(rest)
    results = {**early, **rest}
    assert set(results) == {j.job_id for j in jobs}
    assert all(r.status is JobStatus.SUCCEEDED for r in results.values())
    assert await second.stop() == 0
    assert broker.results.empty() and not broker.conflicts


def _domains() -> list[str]:
    import libvirt

    conn = libvirt.open(LIBVIRT_URI)
    try:
        return [d.name() for d in conn.listAllDomains(0)]
    finally:
        conn.close()


@pytest.fixture
def vm_env(prefix, tmp_path, test_image, test_network, cleanup_topology):
    cleanup_topology.extend(["demo", "demo-silent"])
    return daemon_env(
        prefix,
        tmp_path / "state",
        test_image / "image-map.yaml",
        ORCH_BACKEND="libvirt",
        LIBVIRT_DOMAIN_TYPE="qemu",
        LIBVIRT_NETWORK=test_network,
        ORCH_ID=f"test-{prefix}",
        MAX_CONCURRENCY="2",
        IMAGE_DIR=str(test_image),
    )


async def _wait_for_guest_output(tmp_path: Path, job_id: str, text: str) -> Path:
    """The job's console file once the guest has printed `text` (polled, 90 s deadline)."""
    console = tmp_path / "state" / "logs" / f"{job_id}.console"
    await wait_for(
        lambda: console.exists() and text in console.read_text(errors="replace"),
        timeout_s=90,
        interval_s=0.1,
        what=f"the guest of job {job_id} to print {text!r}",
    )
    return console


async def _kill_mid_job(vm_env, broker, tmp_path) -> tuple[DaemonProcess, str, Path]:
    first = await DaemonProcess(vm_env).start()
    await broker.open()
    job = await broker.submit(runs_on="demo", script="echo before; sleep 8; echo after")
    console = await _wait_for_guest_output(tmp_path, job.job_id, "before")
    await first.kill()
    return first, job.job_id, console


def _assert_nothing_left(tmp_path: Path) -> None:
    assert not [n for n in _domains() if n.startswith("job-")]
    assert list((tmp_path / "state" / "overlays").iterdir()) == []
    assert list((tmp_path / "state" / "seeds").iterdir()) == []


@pytest.mark.libvirt
async def test_sigkill_mid_job_then_restart_adopts_and_finishes_the_vm(vm_env, broker, tmp_path):
    _, job_id, console = await _kill_mid_job(vm_env, broker, tmp_path)
    assert f"job-{job_id}" in _domains()  # the VM outlived the daemon
    second = await DaemonProcess(vm_env).start()
    result = await broker.next_result(timeout_s=120)
    assert str(result.request_id) == job_id
    assert result.status is JobStatus.SUCCEEDED and result.attempt == 1  # adopted, not re-run
    assert any('"job.adopted"' in line for line in second.lines)
    assert "after" in console.read_text()
    assert await second.stop() == 0
    assert broker.results.empty()
    _assert_nothing_left(tmp_path)


@pytest.mark.libvirt
async def test_host_reboot_while_daemon_is_down_reruns_the_job(vm_env, broker, tmp_path):
    _, job_id, _ = await _kill_mid_job(vm_env, broker, tmp_path)
    subprocess.run(
        ["virsh", "-c", LIBVIRT_URI, "destroy", f"job-{job_id}"], check=True, capture_output=True
    )  # "reboot"
    second = await DaemonProcess(vm_env).start()
    result = await broker.next_result(timeout_s=180)
    assert str(result.request_id) == job_id
    assert result.status is JobStatus.SUCCEEDED and result.attempt == 2
    assert await second.stop() == 0
    assert broker.results.empty()
    _assert_nothing_left(tmp_path)


def _domain_xml(name: str, metadata: str = "") -> str:
    return (
        f"<domain type='qemu'><name>{name}</name>{metadata}<memory unit='MiB'>64</memory>"
        "<os><type arch='x86_64' machine='pc'>hvm</type></os></domain>"
    )


@pytest.mark.libvirt
async def test_reconciliation_destroys_only_what_is_ours(vm_env, tmp_path, prefix):
    import libvirt

    from hypervisors.libvirt.domain import METADATA_NS

    ours_id = vm_env["ORCH_ID"]
    orphan_job = str(uuid.uuid4())
    tag = (
        "<metadata><orch:job xmlns:orch='{ns}'><orch:orchestrator>{who}</orch:orchestrator>"
        "<orch:job-id>{job}</orch:job-id></orch:job></metadata>"
    )
    conn = libvirt.open(LIBVIRT_URI)
    foreign = conn.defineXML(_domain_xml(f"foreign-{prefix}"))
    other = conn.defineXML(
        _domain_xml(f"job-{uuid.uuid4()}", tag.format(ns=METADATA_NS, who="another-orchestrator", job="x"))
    )
    orphan = conn.defineXML(_domain_xml(f"job-{orphan_job}", tag.format(ns=METADATA_NS, who=ours_id, job=orphan_job)))
    overlays = tmp_path / "state" / "overlays"
    overlays.mkdir(parents=True)
    (overlays / "operator-disk.qcow2").write_bytes(b"keep me")
    (overlays / f"job-{uuid.uuid4()}.qcow2").write_bytes(b"orphan")
    try:
        daemon = await DaemonProcess(vm_env).start()
        assert await daemon.stop() == 0
        names = _domains()
        assert f"job-{orphan_job}" not in names
        assert foreign.name() in names and other.name() in names
        assert [p.name for p in overlays.iterdir()] == ["operator-disk.qcow2"]
        assert (overlays / "operator-disk.qcow2").read_bytes() == b"keep me"
    finally:
        for domain in (foreign, other, orphan):
            try:
                domain.undefine()
            except libvirt.libvirtError:
                pass
        conn.close()


async def test_a_lost_ack_still_runs_the_journaled_job_once_and_its_redelivery_is_dropped(
    daemon_factory, broker, amqp_proxy
):
    # The connection is cut as the daemon acks: after its journal commit, before the broker has the ack.
    ack_lost = amqp_proxy.cut_at(BASIC_ACK)
    backend = CountingNoop()
    daemon = await daemon_factory(amqp_url=amqp_proxy.url, backend=backend)
    await broker.open()
    job = await broker.submit(runs_on="alpha")
    result = await broker.next_result(timeout_s=30)
    assert ack_lost.is_set() and amqp_proxy.connections >= 2  # cut, and the daemon came back
    assert result.request_id == job.request_id and result.status is JobStatus.SUCCEEDED
    # The broker gave the unacked job back: it is delivered again ahead of the marker.
    marker = await broker.submit(runs_on="alpha")
    assert (await broker.next_result(timeout_s=30)).request_id == marker.request_id
    await daemon.stop()  # a delivery it had not acked would go back to the queue now
    assert await broker.ready_count("alpha") == 0  # the redelivery was taken and acked
    assert backend.starts == {job.job_id: 1, marker.job_id: 1}  # and started no second VM
    assert broker.results.empty() and not broker.conflicts and broker.redeliveries == 0


async def test_job_interrupted_while_the_broker_is_away_is_handed_back_at_next_start(
    daemon_factory, broker, amqp_proxy
):
    backend = NoopHypervisor()
    first = await daemon_factory(host_name="same", drain_timeout_s=0.2, amqp_url=amqp_proxy.url, backend=backend)
    await broker.open()
    job = await broker.submit(runs_on="alpha", env={"NOOP_DURATION_S": "2"})
    await wait_for(lambda: backend.alive == 1, what="the job's VM to be running")
    amqp_proxy.down()
    await first.stop()  # drains for 0.2 s, stops the VM and cannot hand the job back
    assert backend.alive == 0
    assert await broker.ready_count("alpha") == 0  # no hand-back reached the broker
    amqp_proxy.up()
    await daemon_factory(host_name="same", amqp_url=amqp_proxy.url)  # same journal
    result = await broker.next_result(timeout_s=20)
    assert result.request_id == job.request_id
    assert result.status is JobStatus.SUCCEEDED and result.attempt == 2
    assert broker.results.empty() and not broker.conflicts


@pytest.mark.libvirt
async def test_vm_that_finished_while_the_daemon_was_down_is_collected(vm_env, broker, tmp_path):
    first = await DaemonProcess(vm_env).start()
    await broker.open()
    job = await broker.submit(runs_on="demo", script="echo before; sleep 2; echo done; exit 5")
    await _wait_for_guest_output(tmp_path, job.job_id, "before")
    await first.kill()
    domstate = ["virsh", "-c", LIBVIRT_URI, "domstate", f"job-{job.job_id}"]
    await wait_for(
        lambda: "shut off" in subprocess.run(domstate, capture_output=True, text=True).stdout,
        timeout_s=60,
        interval_s=0.2,
        what="the guest to finish and power off on its own",
    )
    second = await DaemonProcess(vm_env).start()
    result = await broker.next_result(timeout_s=60)
    assert str(result.request_id) == job.job_id
    assert result.status is JobStatus.FAILED and result.exit_code == 5 and result.attempt == 1  # collected, not re-run
    assert await second.stop() == 0
    assert broker.results.empty()
    _assert_nothing_left(tmp_path)


class SlowTeardownNoop(NoopHypervisor):
    """A backend whose VMs take a second to tear down, as real ones may: the job they
    held stays held meanwhile."""

    async def destroy(self, spec: VmSpec) -> None:
        await asyncio.sleep(1.0)
        await super().destroy(spec)


async def test_a_job_handed_back_to_its_own_host_runs_as_its_next_attempt(
    prefix, tmp_path, noop_map_path, cleanup_topology, broker
):
    """At restart a job whose VM is gone is handed back (published as attempt 2) before
    this host lets go of attempt 1: the new attempt must wait for that, not bounce
    between the queue and this host until the delivery limit dead-letters it."""
    env = daemon_env(prefix, tmp_path / "state", noop_map_path, ORCH_BACKEND="noop", DELIVERY_LIMIT="5")
    first = await DaemonProcess(env).start()
    await broker.open()
    job = await broker.submit(runs_on="alpha", env={"NOOP_DURATION_S": "3"})
    journal = tmp_path / "state" / "state.db"
    await wait_for(lambda: journal_state(journal, job.job_id) == "running", what="the job to run on the first host")
    await first.kill()
    settings = make_settings(prefix, tmp_path / "state", noop_map_path, host_name="h", delivery_limit=5)
    second = Daemon(settings, load_image_map(noop_map_path), backends={BackendName.NOOP: SlowTeardownNoop()})
    await second.start()
    try:
        result = await broker.next_result(timeout_s=30)
        assert result.request_id == job.request_id
        assert result.status is JobStatus.SUCCEEDED and result.attempt == 2
        channel = await broker.connection.channel()
        dlq = await channel.declare_queue(broker.topology.dlq, passive=True)
        await channel.close()
        assert dlq.declaration_result.message_count == 0
    finally:
        await second.stop()


def journal_state(journal: Path, job_id: str) -> str | None:
    if not journal.exists():
        return None
    with sqlite3.connect(journal) as db:
        row = db.execute("SELECT state FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
    return row[0] if row else None
