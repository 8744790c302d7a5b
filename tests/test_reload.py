"""Reloading the image map (SIGHUP) on the real broker: new labels are consumed, removed
labels are left in the broker for other hosts, a bad map is refused and the old one
stays, and running jobs are never touched."""

from __future__ import annotations

import signal
from pathlib import Path

import aio_pika

from orchestrator.messages import JobStatus
from tests.conftest import NOOP_MAP, wait_for
from tests.daemonproc import DaemonProcess
from tests.test_reliability import daemon_env

GAMMA = "  gamma:\n    backend: noop\n    local_path: /nonexistent/gamma.img\n    size: small\n"
WITHOUT_BETA = NOOP_MAP.split("  beta:\n")[0] + GAMMA


async def consumers_on(amqp: aio_pika.abc.AbstractRobustConnection, queue_name: str) -> int:
    channel = await amqp.channel()
    try:
        queue = await channel.declare_queue(queue_name, passive=True)
        return queue.declaration_result.consumer_count
    finally:
        await channel.close()


async def test_reload_adds_and_removes_labels_and_keeps_running_jobs(daemon_factory, broker, noop_map_path, amqp, cleanup_topology):
    cleanup_topology.append("gamma")
    daemon = await daemon_factory()
    await broker.open()
    running = await broker.submit(runs_on="beta", env={"NOOP_DURATION_S": "1.5"})
    await wait_for(lambda: daemon.job_running(running.job_id), what="the beta job to start")
    noop_map_path.write_text(WITHOUT_BETA)
    assert await daemon.reload()
    assert sorted(daemon.heartbeat().labels) == ["alpha", "gamma"]
    assert await consumers_on(amqp, broker.topology.label_queue("beta")) == 0
    gamma = await broker.submit(runs_on="gamma")
    left = await broker.submit(runs_on="beta")
    results = await broker.collect(2)
    assert results[running.job_id].status is JobStatus.SUCCEEDED, "the running job was not touched"
    assert results[gamma.job_id].status is JobStatus.SUCCEEDED
    assert await broker.ready_count("beta") == 1, f"{left.job_id} stays queued for other hosts"


async def test_a_bad_map_is_refused_and_the_old_one_stays(daemon_factory, broker, noop_map_path, caplog):
    daemon = await daemon_factory()
    noop_map_path.write_text(NOOP_MAP + "    cpu: 2\n")
    assert not await daemon.reload()
    refusal = next(r for r in caplog.records if r.getMessage() == "config.reload_refused")
    assert f"{noop_map_path}:18: images.beta.cpu: unknown key (did you mean 'cpus'?)" in refusal.fields["error"]
    await broker.open()
    job = await broker.submit(runs_on="beta")
    assert (await broker.next_result()).request_id == job.request_id


async def test_sighup_reloads_a_running_daemon(prefix, tmp_path, noop_map_path, broker, cleanup_topology):
    cleanup_topology.append("gamma")
    daemon = await DaemonProcess(daemon_env(prefix, tmp_path / "state", noop_map_path, ORCH_BACKEND="noop")).start()
    noop_map_path.write_text(NOOP_MAP + GAMMA)
    daemon.process.send_signal(signal.SIGHUP)
    await wait_for(lambda: any('"config.reloaded"' in line for line in daemon.lines), what="the daemon to log config.reloaded")
    await broker.open()
    job = await broker.submit(runs_on="gamma")
    result = await broker.next_result()
    assert result.request_id == job.request_id and result.status is JobStatus.SUCCEEDED and result.label == "gamma"
    assert await daemon.stop() == 0
