"""Warm pools on the noop backend against the real broker: the pool's size and the
host's budget measured at the backend (VMs alive), a job taking a pool VM, cold boots
for what the pool cannot serve, room given up to other labels, hand-off failure, image
change, drain and shutdown."""

from __future__ import annotations

import asyncio
import json

import yaml

from hypervisors.base import VmState
from orchestrator.core.imagemap import load_image_map
from orchestrator.core.messages import JobStatus
from orchestrator.host.daemon import Daemon
from orchestrator.host.journal import JobState
from tests.conftest import NOOP_MAP, wait_for
from tests.support.fakes.counting_noop import CountingNoop


def warm_map(tmp_path, *, ready: int = 2, max_age_s: int = 3600, beta_warm: int | None = None):
    document = yaml.safe_load(NOOP_MAP)
    document["images"]["alpha"]["warm"] = {"ready": ready, "max_age_s": max_age_s}
    if beta_warm is not None:
        document["images"]["beta"]["warm"] = {"ready": beta_warm}
    path = tmp_path / "warm-map.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def pool_vms(backend: CountingNoop) -> list[str]:
    """Pool VMs alive at the backend (what counts, whatever the daemon believes)."""
    return [name for name, vm in backend._vms.items() if name.startswith("pool-") and vm.state is VmState.RUNNING]


def ready_in_pool(daemon: Daemon, label: str = "alpha") -> int:
    return daemon.pools.status().get(label, {}).get("ready", 0)


async def start(daemon_factory, tmp_path, backend, **overrides) -> Daemon:
    path = overrides.pop("map_path", None) or warm_map(tmp_path)
    return await daemon_factory(load_image_map(path), backend=backend, config=path, **overrides)


async def test_the_pool_fills_to_ready_and_jobs_never_exceed_the_host(daemon_factory, broker, tmp_path):
    backend = CountingNoop()
    daemon = await start(daemon_factory, tmp_path, backend, max_concurrency=3)
    await wait_for(lambda: ready_in_pool(daemon) == 2, what="the pool to fill")
    assert len(pool_vms(backend)) == 2 and backend.alive == 2
    await asyncio.sleep(0.3)  # a pool over-filling would show by now
    assert backend.peak_alive == 2
    status = daemon.status()
    assert status["warm"]["alpha"]["ready"] == 2 and status["warm_by_label"] == {"alpha": 2}
    # Pool VMs hold their size in the budget: 2 x small (1 vCPU, 256 MiB).
    assert (daemon.ledger.cpus_used, daemon.ledger.memory_mb_used) == (2, 512)
    await broker.open()
    jobs = [await broker.submit(runs_on="alpha", env={"NOOP_DURATION_S": "0.2"}) for _ in range(8)]
    results = await broker.collect(8)
    assert all(r.status is JobStatus.SUCCEEDED for r in results.values())
    # Jobs and pool VMs together: never more VMs than MAX_CONCURRENCY, counted at the backend.
    assert backend.peak_alive == 3
    await wait_for(lambda: ready_in_pool(daemon) == 2, what="the pool to refill")
    assert len(results) == len(jobs)


async def test_a_job_takes_a_pool_vm_and_its_first_command_runs_at_once(daemon_factory, broker, tmp_path):
    backend = CountingNoop()
    daemon = await start(daemon_factory, tmp_path, backend)
    await wait_for(lambda: ready_in_pool(daemon) == 2, what="the pool to fill")
    taken = set(pool_vms(backend))
    await broker.open()
    job = await broker.submit(runs_on="alpha", env={"NOOP_OUTPUT": "hello from a warm VM"})
    result = await broker.next_result()
    assert result.status is JobStatus.SUCCEEDED, result.summary
    record = await daemon.journal.get(job.job_id)
    assert record.vm_name in taken  # the journal says which pool VM it went to
    assert result.timings["to_first_command_s"] < 1.0, result.timings
    console = daemon.console_path(job.job_id).read_text()
    assert "hello from a warm VM" in console and "is waiting for a job" in console
    # Used once: the VM is gone, its pool name for the console too, and the pool refills.
    await wait_for(lambda: record.vm_name not in backend._vms, what="the used pool VM to be destroyed")
    assert not (daemon.settings.state.logs / f"{record.vm_name}.console").exists()
    await wait_for(lambda: ready_in_pool(daemon) == 2, what="the pool to refill")
    assert record.vm_name not in pool_vms(backend)
    assert daemon.pools.status()["alpha"]["taken_total"] == 1


class SlowPoolBoots(CountingNoop):
    """Pool VMs boot at once until `pool_boot_s` is set (a noop boot is instant, a real
    one is not: the pool cannot refill between two jobs)."""

    pool_boot_s = 0.0

    async def wait_ready(self, spec, *, timeout_s):
        if self.pool_boot_s:
            await asyncio.sleep(self.pool_boot_s)
        await super().wait_ready(spec, timeout_s=timeout_s)


async def test_what_the_pool_cannot_serve_boots_cold(daemon_factory, broker, tmp_path):
    backend = SlowPoolBoots()
    daemon = await start(daemon_factory, tmp_path, backend, map_path=warm_map(tmp_path, ready=1))
    await wait_for(lambda: ready_in_pool(daemon) == 1, what="the pool to fill")
    await broker.open()
    bigger = await broker.submit(runs_on="alpha", cpus=2, env={"NOOP_DURATION_S": "0.5"})
    await broker.next_result()
    assert (await daemon.journal.get(bigger.job_id)).vm_name == f"job-{bigger.job_id}"
    assert ready_in_pool(daemon) == 1  # its resources differ: the pool VM was not touched
    # Two at once with one pool VM: one warm, the next cold.
    backend.pool_boot_s = 30.0
    first = await broker.submit(runs_on="alpha", env={"NOOP_DURATION_S": "0.5"})
    second = await broker.submit(runs_on="alpha", env={"NOOP_DURATION_S": "0.5"})
    await broker.collect(2)
    warm = [job for job in (first, second) if (await daemon.journal.get(job.job_id)).vm_name.startswith("pool-")]
    assert len(warm) == 1


async def test_idle_pool_vms_make_room_for_other_labels(daemon_factory, broker, tmp_path):
    backend = CountingNoop()
    daemon = await start(daemon_factory, tmp_path, backend, max_concurrency=2)
    await wait_for(lambda: ready_in_pool(daemon) == 2, what="the pool to fill the host")
    await broker.open()
    betas = [await broker.submit(runs_on="beta", env={"LABEL": "beta", "NOOP_DURATION_S": "0.3"}) for _ in range(3)]
    results = await broker.collect(3, timeout_s=30)
    assert {str(r.request_id) for r in results.values()} == {b.job_id for b in betas}
    assert all(r.status is JobStatus.SUCCEEDED for r in results.values())
    assert backend.peak_alive == 2  # room was given up, never borrowed
    assert backend.peak_by_label["beta"] == 2


async def test_a_failed_hand_off_boots_the_job_cold_with_one_result(daemon_factory, broker, tmp_path):
    backend = CountingNoop()
    daemon = await start(daemon_factory, tmp_path, backend, map_path=warm_map(tmp_path, ready=1))
    await wait_for(lambda: ready_in_pool(daemon) == 1, what="the pool to fill")
    await broker.open()
    job = await broker.submit(runs_on="alpha", env={"NOOP_FAIL": "handoff", "NOOP_OUTPUT": "ran cold"})
    result = await broker.next_result()
    assert result.status is JobStatus.SUCCEEDED, result.summary
    assert "ran cold" in daemon.console_path(job.job_id).read_text()
    record = await daemon.journal.get(job.job_id)
    assert record.vm_name == f"job-{job.job_id}" and record.state in (JobState.FINISHED, JobState.PUBLISHED)
    assert backend.starts[job.job_id] == 1 and daemon.runner.warm_fallbacks == 1
    await asyncio.sleep(0.3)
    assert broker.results.empty() and not broker.conflicts


async def test_a_pool_vm_destroyed_from_outside_is_replaced(daemon_factory, broker, tmp_path):
    backend = CountingNoop()
    daemon = await start(daemon_factory, tmp_path, backend, map_path=warm_map(tmp_path, ready=1))
    await wait_for(lambda: ready_in_pool(daemon) == 1, what="the pool to fill")
    [victim] = pool_vms(backend)
    await backend.destroy(backend._vms[victim].spec)  # as `virsh destroy` would
    await wait_for(
        lambda: pool_vms(backend) and victim not in pool_vms(backend) and ready_in_pool(daemon) == 1,
        timeout_s=20,
        what="a replacement pool VM",
    )
    assert daemon.pools.status()["alpha"]["failed_total"] == 1


async def test_an_image_change_rebuilds_the_pool(daemon_factory, broker, tmp_path):
    backend = CountingNoop()
    path = warm_map(tmp_path, ready=2)
    daemon = await start(daemon_factory, tmp_path, backend, map_path=path)
    await wait_for(lambda: ready_in_pool(daemon) == 2, what="the pool to fill")
    before = set(pool_vms(backend))
    document = yaml.safe_load(path.read_text())
    document["images"]["alpha"]["checkout"] = False  # what a VM is changes
    path.write_text(yaml.safe_dump(document))
    assert await daemon.reload()
    await wait_for(
        lambda: ready_in_pool(daemon) == 2 and not before & set(pool_vms(backend)),
        timeout_s=20,
        what="a pool of new VMs",
    )
    # Only the pool's own settings change: its VMs stay.
    kept = set(pool_vms(backend))
    document["images"]["alpha"]["warm"]["max_age_s"] = 7200
    path.write_text(yaml.safe_dump(document))
    assert await daemon.reload()
    await asyncio.sleep(0.3)
    assert set(pool_vms(backend)) == kept


async def test_draining_and_stopping_destroy_idle_pool_vms(daemon_factory, broker, tmp_path):
    backend = CountingNoop()
    daemon = await start(daemon_factory, tmp_path, backend)
    await wait_for(lambda: ready_in_pool(daemon) == 2, what="the pool to fill")
    daemon.ledger.set_draining(draining=True)
    await wait_for(lambda: not pool_vms(backend), what="idle pool VMs destroyed on drain")
    assert daemon.ledger.warm == 0 and (daemon.ledger.cpus_used, daemon.ledger.memory_mb_used) == (0, 0)
    daemon.ledger.set_draining(draining=False)
    await wait_for(lambda: ready_in_pool(daemon) == 2, what="the pool to refill after the drain")
    await daemon.stop()
    assert not backend._vms and backend.alive == 0
    assert not list(daemon.settings.state.logs.glob("pool-*"))


async def test_heartbeat_and_metrics_show_the_pool(daemon_factory, broker, tmp_path):
    from tests.support.rawhttp import metric, scrape
    from tests.web.test_httpapi import free_port

    backend = CountingNoop()
    port = free_port()
    daemon = await start(daemon_factory, tmp_path, backend, http_listen=f"127.0.0.1:{port}")
    await wait_for(lambda: ready_in_pool(daemon) == 2, what="the pool to fill")
    beat = daemon.heartbeat()
    assert (beat.warm, beat.warm_by_label, beat.running, beat.cpus_used) == (2, {"alpha": 2}, 0, 2)
    text = await scrape(port)
    assert metric(text, 'orchestrator_warm_vms{label="alpha",state="ready"}') == 2
    assert json.loads(json.dumps(daemon.status()))["warm"]["alpha"]["wanted"] == 2


async def test_a_label_whose_pool_keeps_failing_backs_off(daemon_factory, broker, tmp_path):
    class FailingBoots(CountingNoop):
        async def start(self, spec):
            if spec.job_channel is not None:
                from hypervisors.base import BackendError

                raise BackendError("no pool VM boots on this host")
            await super().start(spec)

    backend = FailingBoots()
    daemon = await start(daemon_factory, tmp_path, backend, map_path=warm_map(tmp_path, ready=1))
    # The first failure is replaced at once, the second waits.
    await wait_for(lambda: daemon.pools.status()["alpha"]["failed_total"] >= 2, what="two failed pool boots")
    await asyncio.sleep(1.0)
    status = daemon.pools.status()["alpha"]
    assert status["failed_total"] == 2 and status["retry_in_s"] > 0  # no retry before the backoff
    await broker.open()
    await broker.submit(runs_on="alpha")
    assert (await broker.next_result()).status is JobStatus.SUCCEEDED  # cold jobs run meanwhile


async def test_snapshot_pools_restore_from_one_template_per_image_version(daemon_factory, broker, tmp_path):
    backend = CountingNoop()
    path = warm_map(tmp_path, ready=2)
    document = yaml.safe_load(path.read_text())
    document["images"]["alpha"]["warm"]["snapshot"] = True
    path.write_text(yaml.safe_dump(document))
    daemon = await start(daemon_factory, tmp_path, backend, map_path=path)
    templates = daemon.settings.state.templates
    await wait_for(lambda: ready_in_pool(daemon) == 2, what="a pool restored from its template")
    assert (backend.templates_saved, backend.restores) == (1, 2)
    [first] = list(templates.iterdir())
    await broker.open()
    await broker.submit(runs_on="alpha", env={"NOOP_OUTPUT": "restored"})
    assert (await broker.next_result()).status is JobStatus.SUCCEEDED
    await wait_for(lambda: backend.restores == 3 and ready_in_pool(daemon) == 2, what="a refill by restore")
    assert backend.templates_saved == 1
    # A new image version: a new template, the old one's files removed.
    document["images"]["alpha"]["checkout"] = False
    path.write_text(yaml.safe_dump(document))
    assert await daemon.reload()
    await wait_for(
        lambda: backend.templates_saved == 2 and ready_in_pool(daemon) == 2, what="the pool of the new template"
    )
    assert [p.name for p in templates.iterdir()] != [first.name] and not first.exists()
    await daemon.stop()
    assert list(templates.iterdir()) == []
